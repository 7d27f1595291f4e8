"""What the batch study's tasks share, whichever engine schedules them: classify one file in
this process, with the model loaded once per process, and record when and where it ran, and how
its time split between reading the file and evaluating it (the paper's Fig. 6)."""
from __future__ import annotations

import os
import time

import kafray

_classifiers: dict[tuple[str, int], kafray.Classifier] = {}


def _classifier(model: str, batch_size: int) -> kafray.Classifier:
    key = (model, batch_size)
    if key not in _classifiers:
        _classifiers[key] = kafray.Classifier(model, threads=1, batch_size=batch_size)
    return _classifiers[key]


def _record(file: str, start: float, classify) -> dict:
    """Runs `classify`; a bad file becomes a record with its error, not the end of the job."""
    try:
        result = classify()
        record = {"images": result["images"], "correct": result["correct"], "error": None,
                  "read_s": result["read_s"], "evaluate_s": result["evaluate_s"]}
    except (ValueError, OSError) as e:
        record = {"images": 0, "correct": None, "error": str(e), "read_s": 0.0, "evaluate_s": 0.0}
    record.update(file=file, start=start, end=time.time(), pid=os.getpid())
    return record


def classify_file_record(path: str, model: str, batch_size: int) -> dict:
    """Classifies one file read from a path: file, start, end (epoch s), pid, images, correct,
    error, read_s, evaluate_s."""
    c = _classifier(model, batch_size)
    return _record(path, time.time(), lambda: c.classify_file(path))


def classify_shard_record(name: str, images: bytes, labels: bytes, model: str, batch_size: int,
                          start: float, fetch_s: float = 0.0) -> dict:
    """The same for a shard that arrived in memory; `fetch_s` (getting it here) counts as reading."""
    c = _classifier(model, batch_size)
    record = _record(name, start, lambda: c.classify_shard(name, images, labels))
    record["read_s"] += fetch_s
    return record
