from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.decode import ImageDecodeError, decode_image, load_grayscale, resize_square

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


def _jpeg_bytes(rgb: np.ndarray, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_decode_image_reports_how_coloured_the_source_is(tmp_path: Path) -> None:
    from pneumoscope.data.synthetic import make_phantom

    rng = np.random.default_rng(0)
    film = make_phantom(rng, 64).astype(float)
    # A grey film through a colour pipeline: a slight cast and per-channel noise, then JPEG.
    cast = np.stack([film + 6, film, film - 4], axis=-1) + rng.normal(0, 2, (64, 64, 3))
    grey_rgb = decode_image(_jpeg_bytes(np.clip(cast, 0, 255).round().astype(np.uint8)))
    assert 0 < grey_rgb.channel_spread < 20
    assert decode_image(_jpeg_bytes(np.repeat(film.astype(np.uint8)[..., None], 3, 2))).channel_spread <= 2
    colour = np.stack([film, 255 - film, np.full_like(film, 128)], axis=-1).astype(np.uint8)
    assert decode_image(_jpeg_bytes(colour)).channel_spread > 100
    grey = decode_image(_save(Image.fromarray(GRADIENT, "L"), tmp_path / "g.png"))
    assert grey.channel_spread == 0.0 and grey.dicom is None
    assert (grey.width, grey.height) == (64, 32)


def test_decode_image_matches_load_grayscale_and_samples_big_images(tmp_path: Path) -> None:
    big = np.zeros((600, 1000, 3), np.uint8)
    big[:, :, 0] = 200  # red everywhere: the sampled copy must see it
    path = _save(Image.fromarray(big, "RGB"), tmp_path / "red.png")
    decoded = decode_image(path)
    np.testing.assert_array_equal(decoded.gray, load_grayscale(path))
    assert decoded.gray.shape == (600, 1000) and decoded.channel_spread == 200.0
    assert (decoded.width, decoded.height) == (1000, 600)


def test_decode_image_names_bytes_in_errors() -> None:
    with pytest.raises(ImageDecodeError, match=r"^upload\.png: not a recognised image"):
        decode_image(b"not an image", name="upload.png")
    with pytest.raises(ImageDecodeError, match=r"^<bytes>: "):
        decode_image(b"not an image")
