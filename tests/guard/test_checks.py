"""Deterministic gate checks: one named reason per rule, table-tested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoscope.data.decode import DecodedImage, decode_image
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.guard import Tolerances, check_dicom, check_image, describe_reason

FILM = make_phantom(np.random.default_rng(0), 64)


def _image(width: int = 64, height: int = 64, spread: float = 0.0, gray: np.ndarray | None = None,
           dicom: dict[str, str] | None = None) -> DecodedImage:
    return DecodedImage(FILM if gray is None else gray, width, height, spread, dicom)


@pytest.mark.parametrize(("image", "reasons"), [
    (_image(), ()),
    (_image(spread=31.0), ()),  # grey film with chroma noise / a colour cast
    (_image(spread=80.0), ("colour-image",)),
    (_image(width=40, height=40), ("implausible-size",)),
    (_image(width=2000, height=1600), ()),  # landscape detector: 1.25
    (_image(width=1400, height=2100), ()),  # tall paediatric film: 0.67
    (_image(width=2600, height=1000), ("implausible-aspect-ratio",)),
    (_image(width=300, height=1000), ("implausible-aspect-ratio",)),
    (_image(gray=np.full((64, 64), 128, np.uint8)), ("near-constant-image",)),
    (_image(gray=np.zeros((64, 64), np.uint8), spread=90.0, width=30, height=90),
     ("colour-image", "implausible-size", "implausible-aspect-ratio", "near-constant-image")),
    (_image(dicom={"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA",
                   "PhotometricInterpretation": "MONOCHROME2"}), ()),
    (_image(dicom={"PhotometricInterpretation": "MONOCHROME1"}), ()),  # absent tags pass
])
def test_check_image(image: DecodedImage, reasons: tuple[str, ...]) -> None:
    assert check_image(image) == reasons


@pytest.mark.parametrize(("tags", "reasons"), [
    (None, []),
    ({}, []),
    ({"Modality": "CR", "ViewPosition": "AP", "BodyPartExamined": "THORAX"}, []),
    ({"Modality": "MR"}, ["dicom-modality:MR"]),
    ({"Modality": "ct"}, ["dicom-modality:CT"]),
    ({"BodyPartExamined": "KNEE"}, ["dicom-body-part:KNEE"]),
    ({"ViewPosition": "LL"}, ["dicom-lateral-view"]),
    ({"ViewPosition": "LATERAL"}, ["dicom-lateral-view"]),
    ({"ViewPosition": "RLO"}, ["dicom-view:RLO"]),
    ({"PhotometricInterpretation": "RGB"}, ["dicom-photometric:RGB"]),
    ({"Modality": "US", "BodyPartExamined": "BREAST", "ViewPosition": "RL",
      "PhotometricInterpretation": "PALETTE COLOR"},
     ["dicom-modality:US", "dicom-body-part:BREAST", "dicom-lateral-view",
      "dicom-photometric:PALETTE COLOR"]),
])
def test_check_dicom(tags: dict[str, str] | None, reasons: list[str]) -> None:
    assert check_dicom(tags) == reasons
    for reason in reasons:
        assert describe_reason(reason) != reason  # every reason has a plain-words description


def test_tolerances_are_used_and_validated() -> None:
    small = _image(width=28, height=28)
    assert check_image(small) == ("implausible-size",)
    assert check_image(small, tolerances=Tolerances(min_side=28)) == ()
    # The flatness check reads the resized pixels when given.
    assert check_image(_image(), np.full((32, 32), 7, np.uint8)) == ("near-constant-image",)
    with pytest.raises(ValueError, match=r"tolerances\.colour"):
        Tolerances(colour=-1)
    with pytest.raises(ValueError, match=r"tolerances\.aspect_min"):
        Tolerances(aspect_min=3.0)
    with pytest.raises(ValueError, match="unknown field"):
        Tolerances.from_dict({"colour": 30, "hue": 2})
    assert Tolerances.from_dict(Tolerances().to_dict()) == Tolerances()


def test_dicom_tags_reach_the_checks(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from conftest import write_dicom

    pixels = (make_phantom(np.random.default_rng(1), 64).astype(np.uint16) * 16)
    ok = decode_image(write_dicom(tmp_path / "ok.dcm", pixels, BodyPartExamined="CHEST",
                                  ViewPosition="PA"))
    assert ok.dicom == {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA",
                        "PhotometricInterpretation": "MONOCHROME2"}
    assert ok.channel_spread == 0.0 and check_image(ok) == ()
    knee = decode_image(write_dicom(tmp_path / "knee.dcm", pixels, Modality="MR",
                                    BodyPartExamined="KNEE", ViewPosition="LL"))
    assert check_image(knee) == ("dicom-modality:MR", "dicom-body-part:KNEE", "dicom-lateral-view")
