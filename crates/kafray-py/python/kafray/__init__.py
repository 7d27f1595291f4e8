"""kafray: classify live image streams from Kafka with ONNX models, on Ray workers.

The engine is Rust (``kafray._native``); this package adds the Python surface:

- :class:`Worker`: one consumer-group member on native threads (GIL released), with
  ``start`` / ``stats`` / ``stop``; ``stop`` finishes the last batch, commits and leaves the group.
- :class:`Classifier`: one model classifying whole files (the batch study).
- :mod:`kafray.ray`: workers as Ray actors, owned by one controller per deployment;
  :mod:`kafray.study`: the batch study on Ray and on Spark (:mod:`kafray.spark`), with
  timelines and charts.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os


def _point_at_onnxruntime() -> None:
    """kafray loads libonnxruntime.so at run time: use the one of the installed `onnxruntime`
    package (without importing it) unless ORT_DYLIB_PATH says otherwise."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return
    spec = importlib.util.find_spec("onnxruntime")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(root, "capi", "libonnxruntime.so*")))
        if found:
            os.environ["ORT_DYLIB_PATH"] = found[-1]
            return


_point_at_onnxruntime()

from ._native import (  # noqa: E402
    WORKER_CONFIG_DOCS,
    WORKER_CONFIG_FIELDS,
    Classifier,
    EmbeddedBroker,
    __version__,
    find_model,
    raw_limit,
    write_mnist_shards,
)
from ._native import Worker as _NativeWorker  # noqa: E402

__all__ = ["Worker", "WORKER_CONFIG_FIELDS", "WORKER_CONFIG_DOCS", "Classifier", "EmbeddedBroker", "find_model", "raw_limit", "write_mnist_shards", "__version__"]


class Worker:
    """One kafray worker: a Kafka consumer-group member classifying frames on native threads.

    Keyword arguments are the worker's configuration, as in ``kafray worker`` and its TOML file
    (listed below, from the engine's own documentation of each); ``kafka`` may also be a dict.
    An unknown name raises ValueError naming it.
    """

    def __init__(self, **config):
        kafka = config.get("kafka")
        if isinstance(kafka, dict):
            config["kafka"] = [[str(k), str(v)] for k, v in kafka.items()]
        self._native = _NativeWorker(json.dumps(config))

    @property
    def worker_id(self) -> str:
        return self._native.worker_id

    @property
    def running(self) -> bool:
        return self._native.running

    def start(self) -> "Worker":
        """Loads the model (raising ValueError for a bad one) and joins the group."""
        self._native.start()
        return self

    def stats(self) -> dict:
        """Counters since start; see ``kafray._native.Worker.stats``."""
        return self._native.stats()

    def stop(self, timeout: float | None = None) -> dict:
        """Finishes in-flight frames, commits, leaves the group; returns the final stats. Waits
        at most ``timeout`` seconds (None: 120 s); Ctrl-C interrupts the wait."""
        return self._native.stop(timeout)

    def __enter__(self) -> "Worker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _keyword_docs() -> str:
    """The keyword list of Worker's docstring, from the engine's documentation of each field."""
    import textwrap

    lines = ["", "    Keywords:", ""]
    for name, doc in sorted(WORKER_CONFIG_DOCS.items()):
        text = f"``{name}`` (default: {doc['default']}): {doc['help']}"
        lines += textwrap.wrap(text, 96, initial_indent="    - ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


Worker.__doc__ = (Worker.__doc__ or "") + _keyword_docs()
