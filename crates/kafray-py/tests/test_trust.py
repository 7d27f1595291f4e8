"""What kafray writes into shared folders and trusts back from them: the Prometheus targets file
in Ray's temp folder and the model cache. No Ray, no broker."""
import json
import os
import re
from pathlib import Path

import pytest

from conftest import REPO
from kafray import shipping
from kafray.files import write_file_atomically

MODEL = REPO / "assets" / "models" / "mnist_cnn.onnx"


def test_a_symlink_planted_at_the_old_temporary_name_is_not_followed(tmp_path):
    """The targets file lives in /tmp/ray, parts of which others can write: a link they plant
    where a predictable temporary file would go must not make us overwrite what it points to."""
    victim = tmp_path / "victim"
    victim.write_text("not yours\n")
    targets = tmp_path / "kafray_cams_prom_service_discovery.json"
    (tmp_path / f"{targets.name}.tmp").symlink_to(victim)
    groups = [{"targets": ["10.0.0.1:9100"], "labels": {"kafray_deployment": "cams"}}]

    write_file_atomically(str(targets), json.dumps(groups).encode())

    assert victim.read_text() == "not yours\n", "the write followed the planted link"
    assert not targets.is_symlink() and json.loads(targets.read_text()) == groups
    assert targets.stat().st_mode & 0o777 == 0o644, "Prometheus may run as another user: it must read the file"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv("KAFRAY_MODEL_CACHE", str(root))
    return root


def test_a_model_changed_in_the_cache_is_not_loaded_but_fetched_again(cache, capsys):
    b = shipping.bundle(str(MODEL))
    path = Path(shipping.store(b))
    data = bytearray(path.read_bytes())
    data[1000:1016] = bytes(x ^ 0xFF for x in data[1000:1016])
    path.write_bytes(bytes(data))

    assert shipping.cached(b.digest, b.entry) is None, "a model that no longer matches its digest was offered"
    assert b.digest in capsys.readouterr().err, "the mismatch is said, with the digest"
    assert Path(shipping.store(b)).read_bytes() == MODEL.read_bytes()
    path.write_bytes(bytes(data))
    assert shipping.load(b.digest) is None, "the controller would ship the changed model on"


def test_the_cache_root_is_created_private(cache):
    shipping.store(shipping.bundle(str(MODEL)))
    assert cache.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("digest", ["../outside", "/tmp/outside", "A" * 64, "0" * 63, "0" * 64 + "/"])
def test_a_digest_that_is_not_64_lowercase_hex_characters_is_refused(cache, digest):
    # A complete-looking model folder outside the cache, where "../outside" would lead.
    outside = cache.parent / "outside"
    outside.mkdir()
    (outside / shipping.COMPLETE).write_text("m.onnx\n")
    (outside / "m.onnx").write_bytes(b"planted")
    for lookup in (lambda: shipping.cached(digest, "m.onnx"), lambda: shipping.load(digest),
                   lambda: shipping.store(shipping.Bundle(digest, "m.onnx", {"m.onnx": b"planted"}))):
        with pytest.raises(ValueError, match="64 lowercase hex characters"):
            lookup()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720, 0o702], ids=lambda m: f"{m:04o}")
def test_a_cache_root_that_others_can_write_is_refused(cache, mode):
    cache.mkdir()
    cache.chmod(mode)
    b = shipping.bundle(str(MODEL))
    with pytest.raises(ValueError, match=f"{re.escape(str(cache))}.*chmod 700"):
        shipping.store(b)
    with pytest.raises(ValueError, match=f"{re.escape(str(cache))}.*chmod 700"):
        shipping.cached(b.digest, b.entry)


def test_a_cache_root_of_another_user_is_refused(cache, monkeypatch):
    cache.mkdir(mode=0o700)
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)  # as if the folder were someone else's
    with pytest.raises(ValueError, match=f"{re.escape(str(cache))}.*owned by uid {me}"):
        shipping.store(shipping.bundle(str(MODEL)))
