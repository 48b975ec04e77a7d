"""Near-OOD transforms and synthetic non-chest images used to design and test the gate."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscope.data.synthetic import make_phantom
from pneumoscope.guard.probes import (
    NEAR_OOD,
    NEAR_OOD_EXPECTED,
    SYNTHETIC_KINDS,
    near_ood,
    synthetic_non_chest,
)

FILMS = np.stack([make_phantom(np.random.default_rng(i), 32) for i in range(2)])


@pytest.mark.parametrize("name", sorted(NEAR_OOD))
def test_near_ood_keeps_shape_and_changes_the_film(name: str) -> None:
    out = near_ood(FILMS, name)
    assert out.shape == FILMS.shape and out.dtype == np.uint8
    assert not np.array_equal(out, FILMS)
    assert name in NEAR_OOD_EXPECTED


def test_near_ood_cases() -> None:
    np.testing.assert_array_equal(near_ood(FILMS, "hflip"), FILMS[:, :, ::-1])
    np.testing.assert_array_equal(near_ood(FILMS, "invert"), 255 - FILMS)
    squeezed = near_ood(FILMS, "squeeze")
    assert (squeezed[:, :, :4] == squeezed[:, :, :1]).all()  # padded sides are flat
    with pytest.raises(ValueError, match="unknown near-OOD"):
        near_ood(FILMS, "shear")
    with pytest.raises(ValueError, match="uint8"):
        near_ood(FILMS.astype(float), "hflip")


@pytest.mark.parametrize("kind", sorted(SYNTHETIC_KINDS))
def test_synthetic_kinds(kind: str) -> None:
    a = synthetic_non_chest(np.random.default_rng(0), kind, 2, 32)
    b = synthetic_non_chest(np.random.default_rng(0), kind, 2, 32)
    assert len(a) == 2 and all(x.dtype == np.uint8 and x.shape[:2] == (32, 32) for x in a)
    assert a[0].ndim == (3 if kind == "colour" else 2)
    np.testing.assert_array_equal(a[0], b[0])  # deterministic given the generator
