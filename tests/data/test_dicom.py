from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.decode import IMAGE_SUFFIXES, ImageDecodeError, is_dicom, load_grayscale

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402

from conftest import write_dicom  # noqa: E402

STORED = np.tile(np.linspace(0, 2000, 64).round().astype(np.uint16), (16, 1))  # 16 x 64


def test_rescale_and_window_give_the_windowed_uint8(tmp_path: Path) -> None:
    # Modality values 2*s - 1000 span -1000..3000; the window keeps roughly 0..2000.
    path = write_dicom(tmp_path / "rescaled.dcm", STORED, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=1000, WindowWidth=2000)
    assert is_dicom(path.read_bytes()[:132])
    out = load_grayscale(path)
    assert out.dtype == np.uint8 and out.shape == STORED.shape
    hu = STORED.astype(float) * 2 - 1000
    # DICOM LINEAR window (PS3.3 C.11.2.1.2.1) mapped onto 0..255.
    expected = np.round(np.clip((hu - 999.5) / 1999 + 0.5, 0, 1) * 255)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out[0, 0] == 0 and out[0, -1] == 255 and np.all(np.diff(out[0].astype(int)) >= 0)


def test_no_window_scales_the_full_range_and_monochrome1_is_inverted(tmp_path: Path) -> None:
    plain = load_grayscale(write_dicom(tmp_path / "m2.dcm", STORED))
    expected = np.round(STORED / 2000.0 * 255)
    assert np.abs(plain.astype(int) - expected).max() <= 1
    inverted = load_grayscale(write_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_window_narrower_than_the_image_is_kept_not_stretched(tmp_path: Path) -> None:
    # All pixels lie inside a wide window: they must not be stretched to 0..255.
    out = load_grayscale(write_dicom(tmp_path / "wide.dcm", STORED, WindowCenter=2048,
                                     WindowWidth=4096))
    assert 0 <= out.min() <= 1 and 120 <= out.max() <= 130


def test_voi_lut_sequence(tmp_path: Path) -> None:
    item = Dataset()
    item.LUTDescriptor = [2001, 0, 16]
    # LUT Data's VR is ambiguous (US or OW): say US explicitly. A gamma-like curve onto 0..1000.
    lut = np.round(np.sqrt(np.arange(2001) / 2000) * 1000).astype(int)
    item.add_new(0x00283006, "US", lut.tolist())
    path = write_dicom(tmp_path / "voilut.dcm", STORED, VOILUTSequence=[item])
    out = load_grayscale(path)
    # The LUT is applied, then its output range 0..1000 is scaled onto 0..255.
    np.testing.assert_allclose(out, np.round(lut[STORED] / 1000 * 255), atol=1)


def test_format_is_decided_by_content(tmp_path: Path) -> None:
    dcm = write_dicom(tmp_path / "scan.png", STORED)  # a DICOM named .png
    assert load_grayscale(dcm).shape == STORED.shape
    assert load_grayscale(dcm.read_bytes()).shape == STORED.shape
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 77, np.uint8)).save(buf, "PNG")
    for name in ("png_named.jpeg", "png_named.dcm"):
        (tmp_path / name).write_bytes(buf.getvalue())
        assert load_grayscale(tmp_path / name).max() == 77
    assert ".dcm" in IMAGE_SUFFIXES


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"pixels": np.zeros((2, 16, 16), np.uint16), "frames": 2}, "multi-frame"),
    ({"pixels": None}, "no pixel data"),
    ({"pixels": np.zeros((16, 16, 3), np.uint16), "photometric": "RGB", "samples": 3}, "colour"),
    # The header claims 60000 x 60000 while the pixel data is tiny: refused before decoding.
    ({"pixels": np.zeros((16, 16), np.uint16), "rows": 60000, "cols": 60000}, "above the limit"),
    ({"pixels": np.zeros((4, 4), np.uint16)}, "only 4x4"),
])
def test_unsupported_dicoms_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    path = write_dicom(tmp_path / "bad.dcm", **kwargs)
    with pytest.raises(ImageDecodeError, match=match) as info:
        load_grayscale(path)
    assert "bad.dcm" in str(info.value)


def test_max_pixels_and_truncated_dicom(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ok.dcm", STORED)
    with pytest.raises(ImageDecodeError, match="above the limit"):
        load_grayscale(path, max_pixels=100)
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 500])
    with pytest.raises(ImageDecodeError, match=r"cut\.dcm"):
        load_grayscale(tmp_path / "cut.dcm")


def test_missing_pydicom_gives_an_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dicom(tmp_path / "x.dcm", STORED)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImageDecodeError, match=r"pneumoscope\[dicom\]"):
        load_grayscale(path)


def test_undecodable_compressed_pixels_are_one_line_and_log_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from conftest import write_broken_jpeg2000_dicom

    path = write_broken_jpeg2000_dicom(tmp_path / "j2k.dcm")
    caplog.set_level(logging.INFO)
    with pytest.raises(ImageDecodeError, match=r"j2k\.dcm: cannot decode DICOM pixel data "
                       r"\(transfer syntax JPEG 2000") as info:
        load_grayscale(path)
    assert "\n" not in str(info.value)
    assert not [r for r in caplog.records if r.exc_info], "pydicom logged a traceback"
    # With debug logging (--verbose) the plugin's traceback is kept, for a bug report.
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageDecodeError):
        load_grayscale(path)
    if any(r.name.startswith("pydicom") for r in caplog.records):  # a plugin was tried
        assert [r for r in caplog.records if r.exc_info]
