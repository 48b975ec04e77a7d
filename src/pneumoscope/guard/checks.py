"""Deterministic input checks: rules a frontal chest film always meets, each with a named reason.

These need no fitting and no model: they refuse what is certainly not a frontal chest X-ray
(colour photographs, slivers, blank frames, DICOM files that say they are something else)
before the learned score (:mod:`pneumoscope.guard.ood`) is asked. Every tolerance is generous
on purpose: a refusal here is final, so a real film must never fail one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from pneumoscope.data.decode import DecodedImage

COLOUR_TOLERANCE = 32.0
"""Largest :attr:`DecodedImage.channel_spread` (0–255) of a grey film. Grey content stored as
an RGB JPEG decodes with equal channels when the encoder saw equal channels, and within a few
levels when a scanner or phone pipeline added per-channel noise; a white-balance cast of a
photographed film adds up to about 20 (the tests check a cast of 10 plus noise: under 20).
Colour photographs, stains, dermoscopy and fundus images put well over 1 % of their pixels
above 60."""

MIN_SIDE_PX = 64
"""Smallest side (pixels) of a plausible chest film: below it no lung detail is left, so it is a
thumbnail or an icon. A gate for a model trained on smaller images (PneumoniaMNIST's 28 px)
is built with ``Tolerances(min_side=28)``."""

ASPECT_RANGE = (0.5, 2.0)
"""Width / height bounds. Chest films are about 0.6–1.7 (35x43 cm portrait 0.81, landscape
1.23, square detectors 1.0, tight paediatric collimation a little beyond): the bounds leave a
margin of about 20 % on either side, so a cropped or padded film still passes and only strips
and panoramas fail."""

MIN_STD = 4.0
"""Smallest standard deviation (0–255 levels) of the resized pixels. A blank, fully saturated or
fully black frame sits near 0; an under- or over-exposed film still spans tens of levels (the
gamma and contrast stress tests keep validation films above 20)."""

DICOM_MODALITIES = ("CR", "DX", "DR")
"""Projection radiography: computed and digital radiography (DR is not a DICOM defined term
but some vendors write it)."""

DICOM_BODY_PARTS = ("CHEST", "THORAX")
DICOM_FRONTAL_VIEWS = ("PA", "AP")
DICOM_LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT")
"""ViewPosition values of a lateral film (``LL``/``RL`` are the DICOM defined terms)."""

DICOM_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")

REASONS: dict[str, str] = {
    "colour-image": "the image is in colour; a chest X-ray is grey",
    "implausible-size": "the image is too small to be a chest film",
    "implausible-aspect-ratio": "the image is far too wide or too tall for a chest film",
    "near-constant-image": "the image is (nearly) one flat grey level",
    "dicom-modality:*": "the DICOM Modality is not projection radiography (CR/DX)",
    "dicom-body-part:*": "the DICOM BodyPartExamined is not the chest",
    "dicom-lateral-view": "the DICOM ViewPosition says lateral; the model reads frontal films",
    "dicom-view:*": "the DICOM ViewPosition is neither PA nor AP",
    "dicom-photometric:*": "the DICOM image is not monochrome",
}
"""Every reason a check can give (``*``: the offending tag value, upper case), in plain words."""


@dataclass(frozen=True)
class Tolerances:
    """The deterministic checks' limits; stored in the gate's metadata."""

    colour: float = COLOUR_TOLERANCE
    min_side: int = MIN_SIDE_PX
    aspect_min: float = ASPECT_RANGE[0]
    aspect_max: float = ASPECT_RANGE[1]
    min_std: float = MIN_STD

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"tolerances.{f.name} must be a number >= 0, got {value!r}")
        if not 0 < self.aspect_min < self.aspect_max:
            raise ValueError(f"tolerances.aspect_min must be in (0, aspect_max), got "
                             f"{self.aspect_min!r} (aspect_max {self.aspect_max!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tolerances:
        if not isinstance(d, dict):
            raise ValueError(f"tolerances must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"tolerances has unknown field(s) {unknown}")
        return cls(**d)


DEFAULT_TOLERANCES = Tolerances()


def check_dicom(tags: dict[str, str] | None) -> list[str]:
    """Reasons to refuse a DICOM file by its tags (none for absent tags or non-DICOM input)."""
    if not tags:
        return []
    reasons = []
    modality = tags.get("Modality", "").upper()
    if modality and modality not in DICOM_MODALITIES:
        reasons.append(f"dicom-modality:{modality}")
    part = tags.get("BodyPartExamined", "").upper()
    if part and part not in DICOM_BODY_PARTS:
        reasons.append(f"dicom-body-part:{part}")
    view = tags.get("ViewPosition", "").upper()
    if view in DICOM_LATERAL_VIEWS:
        reasons.append("dicom-lateral-view")
    elif view and view not in DICOM_FRONTAL_VIEWS:
        reasons.append(f"dicom-view:{view}")
    photometric = tags.get("PhotometricInterpretation", "").upper()
    if photometric and photometric not in DICOM_PHOTOMETRIC:
        reasons.append(f"dicom-photometric:{photometric}")
    return reasons


def check_image(image: DecodedImage, resized: np.ndarray | None = None,
                tolerances: Tolerances = DEFAULT_TOLERANCES) -> tuple[str, ...]:
    """Names of the deterministic checks ``image`` fails (empty: it may be a chest film).

    ``resized``: the (S, S) uint8 pixels the classifier gets; the flatness check reads them
    (cheap, and what the model sees), or ``image.gray`` when not given.
    """
    reasons = []
    if image.channel_spread > tolerances.colour:
        reasons.append("colour-image")
    if min(image.width, image.height) < tolerances.min_side:
        reasons.append("implausible-size")
    aspect = image.width / max(1, image.height)
    if not tolerances.aspect_min <= aspect <= tolerances.aspect_max:
        reasons.append("implausible-aspect-ratio")
    pixels = image.gray if resized is None else np.asarray(resized)
    if float(pixels.std()) < tolerances.min_std:
        reasons.append("near-constant-image")
    reasons.extend(check_dicom(image.dicom))
    return tuple(reasons)
