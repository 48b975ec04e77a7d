"""Decoding at the size the model needs: JPEG DCT scaling and DICOM block averaging."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.decode import DRAFT_MARGIN, decode_image, resize_square
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.guard.checks import COLOUR_TOLERANCE, check_image

SIZE = 64
MAX_LEVEL_DIFF = 12
"""Largest |draft - full| (uint8 levels) after the resize to SIZE, on these synthetic films
(observed: 9 for the JPEG, 5 for the DICOM); the shared full-size films are measured by
benchmarks/speed2.py."""


def _film(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A phantom blown up to a film-like size, with grain (what makes a full decode differ)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(make_phantom(rng, size=128, pneumonia=True)).resize(
        (width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (height, width))
    return np.clip(np.asarray(base, dtype=np.float64) + grain, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


def test_large_jpeg_is_decoded_small_and_stays_close_to_a_full_decode() -> None:
    data = _jpeg(_film(1400, 1100))
    full = decode_image(data)
    draft = decode_image(data, draft_size=SIZE)
    # The draft path was taken: libjpeg gave 1/8 scale (ceil(1100 / 8) = 138 >= 2 * 64).
    assert full.gray.shape == (1100, 1400)
    assert draft.gray.shape == (138, 175)
    assert min(draft.gray.shape) >= DRAFT_MARGIN * SIZE
    # The gate's source facts are the file's, not the reduced decode's.
    assert (draft.width, draft.height, draft.channel_spread) == (1400, 1100, 0.0)
    diff = np.abs(resize_square(full.gray, SIZE).astype(int) - resize_square(draft.gray, SIZE))
    assert diff.max() <= MAX_LEVEL_DIFF and diff.mean() < 1.0


def test_small_images_pngs_and_no_draft_size_decode_every_pixel(tmp_path: Path) -> None:
    small = _jpeg(_film(200, 180))  # below DRAFT_MARGIN * SIZE on one side: nothing to gain
    assert decode_image(small, draft_size=SIZE).gray.shape == (180, 200)
    png = tmp_path / "film.png"
    Image.fromarray(_film(600, 500)).save(png)
    assert decode_image(png, draft_size=SIZE).gray.shape == (500, 600)


def test_colour_and_orientation_checks_read_the_source() -> None:
    rng = np.random.default_rng(2)
    # A colour photograph: large patches of saturated colour.
    patches = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    photo = np.asarray(Image.fromarray(patches).resize((1200, 960), Image.Resampling.NEAREST))
    full, draft = decode_image(_jpeg(photo)), decode_image(_jpeg(photo), draft_size=SIZE)
    assert draft.gray.shape[0] < 960 and draft.channel_spread > COLOUR_TOLERANCE
    assert "colour-image" in check_image(draft) and "colour-image" in check_image(full)
    # EXIF orientation 6 (rotated on display): the displayed size is swapped in both paths.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(_film(1500, 1000), exif=exif)
    full, draft = decode_image(data), decode_image(data, draft_size=SIZE)
    assert (full.width, full.height) == (draft.width, draft.height) == (1000, 1500)
    assert draft.gray.shape[0] > draft.gray.shape[1]  # the reduced pixels were turned too
    # A strip stays a strip for the aspect check, whatever the scale it was decoded at.
    strip = decode_image(_jpeg(_film(2400, 400)), draft_size=SIZE)
    assert (strip.width, strip.height) == (2400, 400)
    assert "implausible-aspect-ratio" in check_image(strip)


def test_large_dicom_is_averaged_before_the_luts(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from conftest import write_dicom

    stored = (_film(1030, 900, seed=3).astype(np.uint16) * 16)  # 12-bit
    path = write_dicom(tmp_path / "film.dcm", stored, WindowCenter=2000, WindowWidth=3500,
                       BodyPartExamined="CHEST")
    full, draft = decode_image(path), decode_image(path, draft_size=SIZE)
    assert draft.gray.shape == (225, 257)  # averaged 4x4: 900 // 4 = 225 >= 2 * 64 > 900 // 8
    assert (draft.width, draft.height, draft.dicom) == (1030, 900, full.dicom)
    diff = np.abs(resize_square(full.gray, SIZE).astype(int) - resize_square(draft.gray, SIZE))
    assert diff.max() <= MAX_LEVEL_DIFF and diff.mean() < 1.0
