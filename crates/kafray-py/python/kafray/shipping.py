"""Models shipped to hosts that have no copy: a bundle of the model's files, named by its content.

The driver reads the `.onnx` and its companions (TOML, labels) into a bundle whose digest is a
SHA-256 over the names and the bytes. Each host keeps bundles in a cache folder, one folder per
digest (``$KAFRAY_MODEL_CACHE``, default ``~/.cache/kafray/models``), written under a temporary
name and renamed when complete, so a half-written model is never loaded. ``kafray.ray`` moves
bundles through Ray's object store; this module knows nothing of Ray.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import _native

COMPLETE = ".complete"


@dataclass(frozen=True)
class Bundle:
    digest: str
    entry: str  # the .onnx file's name inside the bundle
    files: dict[str, bytes]

    @property
    def key(self) -> dict:
        """What a worker needs to find the model in its host's cache: {"digest", "entry"}."""
        return {"digest": self.digest, "entry": self.entry}


def digest_of(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def bundle(model_path: str) -> Bundle:
    """The model's files (the .onnx, its TOML and labels), read on this host."""
    path = Path(model_path)
    names = [path.name, *_native.model_companions(str(path))]
    files = {name: (path.parent / name).read_bytes() for name in names}
    return Bundle(digest_of(files), path.name, files)


def cache_root() -> Path:
    return Path(os.environ.get("KAFRAY_MODEL_CACHE") or Path.home() / ".cache" / "kafray" / "models")


def cached(digest: str, entry: str) -> str | None:
    """The cached model's path on this host, or None."""
    folder = cache_root() / digest
    return str(folder / entry) if (folder / COMPLETE).exists() else None


def store(b: Bundle) -> str:
    """Writes the bundle into this host's cache (once) and returns the model's path there."""
    if digest_of(b.files) != b.digest:
        raise ValueError(f"model bundle {b.digest[:12]}: its files do not match its digest")
    if (path := cached(b.digest, b.entry)) is not None:
        return path
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{b.digest[:12]}-", dir=root))
    try:
        for name, data in b.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / COMPLETE).write_text(b.entry + "\n")
        try:
            os.rename(tmp, root / b.digest)
        except OSError:  # another worker on this host stored it first: same bytes
            if cached(b.digest, b.entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(root / b.digest / b.entry)


def load(digest: str) -> Bundle | None:
    """A bundle back from this host's cache, or None."""
    folder = cache_root() / digest
    if not (folder / COMPLETE).exists():
        return None
    entry = (folder / COMPLETE).read_text().strip()
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
             and p.name != COMPLETE}
    return Bundle(digest, entry, files)
