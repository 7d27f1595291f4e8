"""`resize = "crop"` builds the tensor torchvision's ImageNet evaluation builds: shorter side to
256 (bilinear), the centre 224x224, x/255, then (x - mean) / std. The reference is written out here
with Pillow and numpy, as torchvision's transforms do it on PIL images."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kafray

PHOTOS = sorted((Path(__file__).resolve().parents[3].parent / "shared" / "assets" / "images").iterdir())
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# One 8-bit level after normalisation. kafray resizes in Pillow's order (width, then height, each
# pass rounded to 8 bits), so nearly every value equals the reference to float precision; the
# rest (under 1 %: fixed-point rounding) are a level off. A JPEG may be two off: its decoder is not
# libjpeg. A wrong filter, pass order, scale or crop offset changes far more values than that.
ONE_LEVEL = 1 / 255 / STD.min()


def torchvision_eval(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)  # Resize(256)
    img = img.resize(size, Image.BILINEAR)
    top, left = int(round((size[1] - 224) / 2.0)), int(round((size[0] - 224) / 2.0))  # CenterCrop(224)
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0  # ToTensor
    return ((x - MEAN) / STD).transpose(2, 0, 1)[None]  # Normalize, NCHW


def four_by_three(tmp_path_factory) -> Path:
    """A 640x480 frame, as many cameras send: resized to 341x256 it leaves a 58.5-pixel margin,
    which torchvision rounds to even (58)."""
    path = tmp_path_factory.mktemp("frames") / "camera_640x480.png"
    Image.open(PHOTOS[0]).convert("RGB").resize((640, 480), Image.BILINEAR).save(path)
    return path


@pytest.mark.parametrize("photo", [*PHOTOS, four_by_three], ids=[*(p.name for p in PHOTOS), "640x480"])
def test_crop_gives_torchvisions_evaluation_tensor(photo, tmp_path_factory):
    if callable(photo):
        photo = photo(tmp_path_factory)
    classifier = kafray.Classifier("mobilenet_v2")
    shape, raw = classifier.input_tensor(str(photo))
    got = np.frombuffer(raw, dtype="<f4").reshape(shape)
    want = torchvision_eval(photo)
    assert got.shape == want.shape == (1, 3, 224, 224)
    diff = np.abs(got - want)
    off = (diff > 1e-5).mean()
    assert off < 0.01, f"{photo.name}: {off:.1%} of the values differ"
    levels = 1 if photo.suffix == ".png" else 2
    assert diff.max() <= levels * ONE_LEVEL + 1e-5, f"{photo.name}: max difference {diff.max():.4f}"


def test_the_photos_are_not_square_so_the_crop_matters():
    sizes = {Image.open(p).size for p in PHOTOS}
    assert any(w != h for w, h in sizes), sizes
