"""Writing files into folders that others can write too (Ray's /tmp/ray, the model cache)."""
from __future__ import annotations

import os
import tempfile


def write_file_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replaces `path` with `data` whole: a reader sees the old file or the new one, never half.
    The temporary file gets a random name and is created exclusively (mkstemp), so a link that
    another user planted at a name we would have chosen is never followed; `mode` lets another
    user (a Prometheus server) read the result."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def fsync_dir(path) -> None:
    """Makes the folder's entries (a rename, a new file) survive a crash of the host."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
