"""Acquisition-shift stress tests: fixed, deterministic changes to how a film looks.

A validation split drawn from the training pool shares its acquisition with the training
images, so a model can score near-perfectly on it and still lose specificity on films from
another period or device. Re-scoring the same labelled images after each change below shows
whether the scores (and the frozen operating point) survive such shifts, without touching any
test data. Every change keeps the image size and the uint8 grey range, and none changes the
anatomy, so the label stays valid.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pneumoscope.evaluation.metrics import binary_metrics

if TYPE_CHECKING:
    from pneumoscope.evaluation.tta import View
    from pneumoscope.models.factory import XrayClassifier

Perturbation = Callable[[np.ndarray], np.ndarray]


def _per_image(fn: Callable[[Image.Image], Image.Image]) -> Perturbation:
    def apply(images: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(fn(Image.fromarray(img, mode="L")), dtype=np.uint8)
                         for img in images])
    return apply


def _gamma(g: float) -> Perturbation:
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** g).astype(np.uint8)
    return lambda images: lut[images]


def _contrast(factor: float) -> Perturbation:
    def apply(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        mean = x.mean(axis=(1, 2), keepdims=True)
        return np.clip(np.round((x - mean) * factor + mean), 0, 255).astype(np.uint8)
    return apply


def _noise(std: float, seed: int = 0) -> Perturbation:
    def apply(images: np.ndarray) -> np.ndarray:
        # A fixed seed: the same noise for every model, so scores are comparable.
        rng = np.random.default_rng(seed)
        x = images.astype(np.float32) + rng.normal(0.0, std, images.shape).astype(np.float32)
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    return apply


def _jpeg(quality: int) -> Perturbation:
    def once(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")
    return _per_image(once)


def _low_resolution(factor: float) -> Perturbation:
    def once(img: Image.Image) -> Image.Image:
        small = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
        return img.resize(small, Image.Resampling.BILINEAR).resize(img.size, Image.Resampling.BILINEAR)
    return _per_image(once)


def _blur(sigma_at_224: float) -> Perturbation:
    def once(img: Image.Image) -> Image.Image:
        # Sized relative to the image so a 160 px and a 224 px model see the same optical blur.
        return img.filter(ImageFilter.GaussianBlur(sigma_at_224 * img.width / 224))
    return _per_image(once)


STRESS_TESTS: dict[str, tuple[str, Perturbation]] = {
    "gamma_0.67": ("gamma", _gamma(0.67)),
    "gamma_1.5": ("gamma", _gamma(1.5)),
    "contrast_0.7": ("contrast", _contrast(0.7)),
    "blur": ("blur", _blur(1.5)),
    "noise": ("noise", _noise(8.0)),
    "jpeg_q20": ("jpeg", _jpeg(20)),
    "low_resolution": ("low_resolution", _low_resolution(0.5)),
    "equalize": ("equalize", _per_image(ImageOps.equalize)),
    "sharpen": ("sharpen", _per_image(lambda im: im.filter(
        ImageFilter.UnsharpMask(radius=2, percent=150, threshold=0)))),
}
"""``name -> (family, perturbation)``. Families name the kind of change, so a study can keep
apart the changes a training augmentation already covers (gamma, contrast) from the others."""


def perturb(images: np.ndarray, name: str) -> np.ndarray:
    """``images`` (uint8, (N, H, W)) after the stress test ``name``; same shape and dtype."""
    if name not in STRESS_TESTS:
        raise ValueError(f"unknown stress test {name!r}; expected one of {sorted(STRESS_TESTS)}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"perturb expects uint8 images of shape (N, H, W), got {images.dtype} "
                         f"{images.shape}")
    out = STRESS_TESTS[name][1](images)
    assert out.shape == images.shape and out.dtype == np.uint8
    return out


STRESS_METRICS = ("auc", "log_loss", "sensitivity", "specificity", "balanced_accuracy")


def stress_probabilities(model: XrayClassifier, images: np.ndarray,
                         names: Sequence[str] | None = None,
                         tta: Sequence[View] | None = None) -> dict[str, np.ndarray]:
    """The model's PNEUMONIA probabilities for ``images`` after each stress test (``tta``: as
    in :func:`~pneumoscope.evaluation.inference.predict_proba`)."""
    from pneumoscope.evaluation.inference import predict_proba

    return {name: predict_proba(model, perturb(images, name), tta=tta) for name in (names or STRESS_TESTS)}


def stress_report(labels: np.ndarray, probs: Mapping[str, np.ndarray],
                  threshold: float) -> dict[str, dict[str, float]]:
    """:data:`STRESS_METRICS` per condition (e.g. ``clean`` and every stress test) at one
    frozen threshold: a drop in specificity or sensitivity under a change shows how fragile
    that operating point is."""
    out = {}
    for name, p in probs.items():
        metrics = binary_metrics(labels, p, threshold)
        out[name] = {k: metrics[k] for k in STRESS_METRICS}
    return out
