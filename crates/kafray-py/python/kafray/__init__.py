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
    WORKER_CONFIG_FIELDS,
    Classifier,
    EmbeddedBroker,
    __version__,
    find_model,
    raw_limit,
    write_mnist_shards,
)
from ._native import Worker as _NativeWorker  # noqa: E402

__all__ = ["Worker", "WORKER_CONFIG_FIELDS", "Classifier", "EmbeddedBroker", "find_model", "raw_limit", "write_mnist_shards", "__version__"]


class Worker:
    """One kafray worker: a Kafka consumer-group member classifying frames on native threads.

    Keyword arguments are the worker's configuration, as in ``kafray worker`` and its TOML file:
    ``brokers``, ``input_topic``, ``output_topic``, ``dead_letter_topic``, ``group``, ``model``,
    ``batch_size``, ``max_wait_ms``, ``latency_target_ms``, ``threads``, ``device`` (``cpu``,
    ``cuda``, ``cuda:N`` or ``auto``), ``top_k``, ``max_in_flight``, ``stall_after_s`` (the
    stall watchdog: seconds an owned partition may make no progress; 0 for off),
    ``status_interval_s``, ``worker_id``, ``kafka`` (a dict of librdkafka properties; a value
    may be ``${env:NAME}`` or ``${file:PATH:KEY}``), ``kafka_config`` (a client.properties file,
    the place for credentials), ``insecure_skip_tls_verify`` (accept turning TLS verification off),
    ``metrics_addr`` (the Prometheus endpoint with the probes ``/healthz`` and ``/readyz``,
    ``host:port``; ``""`` for none) and
    ``create_topics`` (create missing input/output topics with this many partitions at start).
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
