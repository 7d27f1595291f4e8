"""What the batch study's tasks share, whichever engine schedules them: classify one file in
this process, with the model loaded once per process, and record when and where it ran."""
from __future__ import annotations

import os
import time

import kafray

_classifiers: dict[tuple[str, int], kafray.Classifier] = {}


def classify_file_record(path: str, model: str, batch_size: int) -> dict:
    """Classifies one file and times it: file, start, end (epoch s), pid, images, correct, error.
    A bad file becomes a record with its error, not the end of the job."""
    key = (model, batch_size)
    if key not in _classifiers:
        _classifiers[key] = kafray.Classifier(model, threads=1, batch_size=batch_size)
    start = time.time()
    try:
        result = _classifiers[key].classify_file(path)
        record = {"images": result["images"], "correct": result["correct"], "error": None}
    except (ValueError, OSError) as e:
        record = {"images": 0, "correct": None, "error": str(e)}
    record.update(file=path, start=start, end=time.time(), pid=os.getpid())
    return record
