from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.decode import ImageDecodeError, load_grayscale, resize_square

GRADIENT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # 32 x 64


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_modes_become_the_same_gray(tmp_path: Path, mode: str) -> None:
    img = Image.fromarray(GRADIENT, "L").convert(mode)
    out = load_grayscale(_save(img, tmp_path / f"x_{mode}.png"))
    assert out.dtype == np.uint8 and out.shape == GRADIENT.shape
    assert np.abs(out.astype(int) - GRADIENT).max() <= 2


def test_16bit_png_uses_full_range(tmp_path: Path) -> None:
    arr16 = (GRADIENT.astype(np.uint16) * 200)
    out = load_grayscale(_save(Image.fromarray(arr16), tmp_path / "x16.png"))
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # monotone, not clipped


def test_jpeg_bytes_and_exif_orientation(tmp_path: Path) -> None:
    img = Image.fromarray(GRADIENT, "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(img, tmp_path / "rot.jpeg", exif=exif, quality=95)
    out = load_grayscale(path)
    assert out.shape == (64, 32)
    assert load_grayscale(path.read_bytes()).shape == (64, 32)


@pytest.mark.parametrize(("content", "match"), [
    (b"", "not a recognised image"),
    (b"hello, I am text", "not a recognised image"),
    (b"\xff\xd8\xff\xe0" + bytes(200), "corrupt|not a recognised|cannot decode"),
])
def test_bad_files_raise_clear_errors(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.jpeg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=match) as info:
        load_grayscale(path)
    assert "bad.jpeg" in str(info.value)


def test_truncated_and_missing_and_huge(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), np.uint8)).save(
        buf, "PNG")
    path = tmp_path / "trunc.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match=r"trunc\.png"):
        load_grayscale(path)
    with pytest.raises(ImageDecodeError, match="cannot open"):
        load_grayscale(tmp_path / "nope.png")
    big = _save(Image.new("L", (400, 300)), tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="above the limit"):
        load_grayscale(big, max_pixels=100_000)
    tiny = _save(Image.new("L", (4, 4)), tmp_path / "tiny.png")
    with pytest.raises(ImageDecodeError, match="only 4x4"):
        load_grayscale(tiny)


def test_resize_square() -> None:
    out = resize_square(GRADIENT, 48)
    assert out.shape == (48, 48) and out.dtype == np.uint8
    assert resize_square(out, 48) is out
