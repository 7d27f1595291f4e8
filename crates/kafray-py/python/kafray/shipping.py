"""Models shipped to hosts that have no copy: a bundle of the model's files, named by its content.

The driver reads the `.onnx` and its companions (TOML, labels) into a bundle whose digest is a
SHA-256 over the names and the bytes. Each host keeps bundles in a cache folder, one folder per
digest (``$KAFRAY_MODEL_CACHE``, default ``~/.cache/kafray/models``), written under a temporary
name, synced and renamed when complete, so a half-written model is never loaded. The cache root
is private (0700, refused if another user could write it), and a cached model is checked
against its digest before a worker loads it: a changed one is removed and fetched again.
``kafray.ray`` moves bundles through Ray's object store; this module knows nothing of Ray.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import _native
from .files import fsync_dir

COMPLETE = ".complete"
# A digest names a folder in the cache: only a SHA-256 in hex, so none names a path outside it.
DIGEST = re.compile(r"[0-9a-f]{64}")


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


def _checked_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ValueError(f"model digest {digest!r}: expected 64 lowercase hex characters (a SHA-256)")
    return digest


def private_root(create: bool) -> Path | None:
    """The cache root, created 0700; None if absent and not `create`. Refused if another user
    could write it: they could swap a model between its check and its load."""
    root = cache_root()
    if create:
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            pass
    try:
        st = root.stat()
    except FileNotFoundError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ValueError(f"model cache {root} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:04o}; it "
                         f"must be yours (uid {os.getuid()}) and writable by you alone, or another user could "
                         f"change the models workers load: chmod 700 {root}, or set KAFRAY_MODEL_CACHE to a "
                         f"folder of your own")
    return root


def _verified_files(digest: str) -> tuple[str, dict[str, bytes]] | None:
    """The cached bundle's entry and files if they still match its digest, else None. A folder
    that no longer matches (a bad disk, a stray write) is said and removed, to be fetched again."""
    _checked_digest(digest)
    root = private_root(create=False)
    if root is None or not (root / digest / COMPLETE).exists():
        return None
    folder = root / digest
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
             and p.name != COMPLETE}
    if digest_of(files) == digest:
        return (folder / COMPLETE).read_text().strip(), files
    print(f"kafray: the cached model {folder} does not match its digest {digest}: removing it to fetch it again",
          file=sys.stderr, flush=True)
    # Moved aside first (atomic): a worker storing it afresh meanwhile keeps its copy.
    trash = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-bad-", dir=root))
    try:
        os.rename(folder, trash / digest)
    except FileNotFoundError:  # another worker removed it first
        pass
    shutil.rmtree(trash, ignore_errors=True)
    return None


def cached(digest: str, entry: str) -> str | None:
    """The cached model's path on this host (its files checked against the digest), or None."""
    found = _verified_files(digest)
    return str(cache_root() / digest / entry) if found is not None and entry in found[1] else None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def store(b: Bundle) -> str:
    """Writes the bundle into this host's cache (once) and returns the model's path there."""
    _checked_digest(b.digest)
    if digest_of(b.files) != b.digest:
        raise ValueError(f"model bundle {b.digest[:12]}: its files do not match its digest")
    if b.entry not in b.files or any(Path(n).is_absolute() or ".." in Path(n).parts for n in b.files):
        raise ValueError(f"model bundle {b.digest[:12]}: its files must lie in its folder and include {b.entry!r}")
    if (path := cached(b.digest, b.entry)) is not None:
        return path
    root = private_root(create=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{b.digest[:12]}-", dir=root))
    try:
        for name, data in b.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _write_synced(tmp / name, data)
        _write_synced(tmp / COMPLETE, (b.entry + "\n").encode())
        # Synced before the rename, so after a crash a complete-looking folder is complete.
        for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_dir(folder)
        try:
            os.rename(tmp, root / b.digest)
        except OSError:  # another worker on this host stored it first: same bytes
            if cached(b.digest, b.entry) is None:
                raise
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(root / b.digest / b.entry)


def load(digest: str) -> Bundle | None:
    """A bundle back from this host's cache (its files checked against the digest), or None."""
    found = _verified_files(digest)
    return None if found is None else Bundle(digest, *found)
