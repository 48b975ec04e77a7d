import numpy as np
import pytest

from pneumoscope.evaluation.stress import STRESS_TESTS, perturb


def _images() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:40]
    base = (xx * 5 + yy * 2).astype(np.uint8)  # a smooth gradient, like soft tissue
    noise = np.random.default_rng(1).integers(0, 40, (3, 48, 40))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(STRESS_TESTS))
def test_every_stress_test_keeps_shape_and_dtype_changes_pixels_and_is_deterministic(name: str) -> None:
    images = _images()
    out = perturb(images, name)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - images).mean() > 0.5
    np.testing.assert_array_equal(out, perturb(images, name))


def test_gamma_and_contrast_match_hand_computed_values() -> None:
    images = np.array([[[0, 64, 128, 255]]], dtype=np.uint8)
    # 255 * (v / 255) ** 1.5, rounded: 64 -> 32.06 -> 32, 128 -> 90.69 -> 91, 255 -> 255
    np.testing.assert_array_equal(perturb(images, "gamma_1.5"), [[[0, 32, 91, 255]]])
    # mean 111.75; (v - mean) * 0.7 + mean, rounded
    np.testing.assert_array_equal(perturb(images, "contrast_0.7"), [[[34, 78, 123, 212]]])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown stress test 'fog'"):
        perturb(_images(), "fog")
    with pytest.raises(ValueError, match="uint8 images of shape"):
        perturb(_images().astype(np.float32), "blur")
