from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.decode import (
    SUPPORTED_FORMATS,
    ImageDecodeError,
    decode_image,
    load_grayscale,
    resize_square,
    sniff_format,
)

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


OTHER_FORMATS = [("GIF", "GIF", {}), ("BMP", "BMP", {}), ("TIFF", "TIFF", {}),
                 ("WEBP", "WebP", {"lossless": True}), ("JPEG2000", "JPEG 2000", {})]


@pytest.mark.parametrize(("pil_format", "named", "kw"), OTHER_FORMATS)
def test_only_jpeg_png_and_dicom_are_read_whatever_the_name(
        tmp_path: Path, pil_format: str, named: str, kw: dict) -> None:
    from PIL import features

    if pil_format in ("WEBP", "JPEG2000") and not features.check(
            {"WEBP": "webp", "JPEG2000": "jpg_2000"}[pil_format]):
        pytest.skip(f"this Pillow cannot write {pil_format}")
    buf = io.BytesIO()
    Image.fromarray(GRADIENT, "L").save(buf, format=pil_format, **kw)
    assert Image.open(io.BytesIO(buf.getvalue())).format is not None  # Pillow itself reads it
    path = tmp_path / "renamed.png"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ImageDecodeError, match=rf"renamed\.png: unsupported file type {named} "
                       r"\(PneumoScope reads JPEG, PNG, DICOM"):
        decode_image(path)
    assert sniff_format(buf.getvalue()) is None


@pytest.mark.parametrize("pil_format", ["PNG", "JPEG"])
def test_sniff_format_agrees_with_pillow(pil_format: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(GRADIENT, "L").save(buf, format=pil_format)
    assert sniff_format(buf.getvalue()) == Image.open(buf).format == pil_format


def test_the_service_uses_the_decoders_rule() -> None:
    from pneumoscope.serve import upload

    assert upload.sniff_type is sniff_format
    assert upload.SUPPORTED_TYPES == SUPPORTED_FORMATS == ("JPEG", "PNG", "DICOM")


FILM = np.tile(np.linspace(10, 240, 48).astype(np.uint8), (40, 1))  # 40 x 48, no zeros


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _with_alpha(gray: np.ndarray, alpha: np.ndarray, mode: str) -> Image.Image:
    if mode == "LA":
        return Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    return Image.fromarray(np.stack([gray, gray, gray, alpha], axis=-1), "RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_does_not_change_the_visible_film(mode: str) -> None:
    plain = decode_image(_png(Image.fromarray(FILM, "L"))).gray
    opaque = decode_image(_png(_with_alpha(FILM, np.full_like(FILM, 255), mode)))
    np.testing.assert_array_equal(opaque.gray, plain)  # fully opaque == without alpha
    assert opaque.channel_spread == 0.0
    # Semi-transparent everywhere (the case): the stored values, not scaled by alpha.
    half = decode_image(_png(_with_alpha(FILM, np.full_like(FILM, 128), mode))).gray
    np.testing.assert_array_equal(half, plain)
    # Fully transparent pixels have no defined value: black (background), whatever is stored.
    alpha = np.full_like(FILM, 255)
    alpha[:, :8] = 0
    holed = decode_image(_png(_with_alpha(FILM, alpha, mode))).gray
    assert (holed[:, :8] == 0).all()
    np.testing.assert_array_equal(holed[:, 8:], plain[:, 8:])


def test_rgba_with_colour_hidden_under_transparency_is_not_colour() -> None:
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., :3] = FILM[..., None]
    rgba[:, :8, :3] = (255, 0, 0)  # red, but fully transparent
    rgba[:, 8:, 3] = 255
    decoded = decode_image(_png(Image.fromarray(rgba, "RGBA")))
    assert decoded.channel_spread == 0.0 and (decoded.gray[:, :8] == 0).all()


def test_palette_with_a_transparent_entry() -> None:
    img = Image.fromarray(FILM, "L").convert("P")
    idx = np.asarray(img).copy()
    idx[:, :8] = 0
    pal = Image.fromarray(idx, "P")
    pal.putpalette(img.getpalette())
    opaque = decode_image(_png(pal)).gray
    pal.info["transparency"] = 0
    transparent = decode_image(_png(pal)).gray
    assert (transparent[:, :8] == 0).all()
    np.testing.assert_array_equal(transparent[:, 8:], opaque[:, 8:])
