"""The input gate: deterministic checks plus a learned OOD score, one verdict per image.

A verdict is ``ok`` (looks like the training films), ``warn`` (unlike the training films: the
probability is shown but unreliable) or ``refuse`` (not a frontal chest film: no probability).
Deterministic refusals (:mod:`pneumoscope.guard.checks`) win over the score.

The two score levels come from *validation* films only, fixed when the gate is fitted and
before any OOD image is looked at (:func:`choose_levels`). The gate's state (the frozen
extractor's weights, the fitted Gaussian, the levels) travels inside the model checkpoint
(:meth:`Gate.to_tensors`, :meth:`Gate.metadata`, :meth:`Gate.from_state`), so predicting
needs no weights package and cannot pair a model with another model's gate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pneumoscope import __version__
from pneumoscope.data.decode import DecodedImage
from pneumoscope.guard.checks import DEFAULT_TOLERANCES, REASONS, Tolerances, check_image
from pneumoscope.guard.ood import DEFAULT_FEATURES, FeatureSpec, OODScorer

log = logging.getLogger(__name__)

GATE_FORMAT = "pneumoscope-gate/1"
GATE_PREFIX = "gate."
"""Key prefix of the gate's tensors inside a checkpoint."""

WARN_QUANTILE = 0.99
"""``warn`` level: this quantile of the clean validation films' scores, so about 1 % of films
like the training ones are flagged; anything further out is unlike the training films."""

REFUSE_QUANTILE = 0.995
"""``refuse`` level: this quantile of the validation films' scores after each acquisition
stress test (:mod:`pneumoscope.evaluation.stress`), pooled."""

Status = Literal["ok", "warn", "refuse"]

OOD_REASONS = {
    "ood-score-above-warn": "the image is unlike the training films: the probability is unreliable",
    "ood-score-above-refuse": "the image is too unlike any chest film the model was trained on",
    "ood-score-not-finite": "the out-of-distribution score could not be computed",
}


def describe_reason(reason: str) -> str:
    """One plain sentence for a verdict reason (``dicom-modality:MR`` → the Modality rule)."""
    if reason in OOD_REASONS:
        return OOD_REASONS[reason]
    if reason in REASONS:
        return REASONS[reason]
    prefix, _, value = reason.partition(":")
    text = REASONS.get(f"{prefix}:*")
    return f"{text} ({value})" if text else reason


@dataclass(frozen=True)
class Verdict:
    """What the gate says about one image."""

    status: Status
    reasons: tuple[str, ...] = ()
    """Names of the failed checks and crossed levels (empty when ``ok``)."""
    ood_score: float | None = None
    """The learned score (None when the gate is disabled or not fitted)."""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": list(self.reasons), "ood_score": self.ood_score}


@dataclass(frozen=True)
class GateLevels:
    """The two declared score levels and how they were set.

    ``warn`` is the 99th percentile of clean validation scores. ``refuse`` is the 99.5th
    percentile of the same validation films' scores under the acquisition stress tests (gamma,
    contrast, blur, noise, JPEG, low resolution, equalisation, sharpening), pooled, and never
    below ``warn``. Why: those tests simulate films of the same anatomy from another hospital
    or device, which the gate must not refuse; they should land in ``warn`` at most. So
    ``refuse`` sits where a stressed chest film almost never reaches, instead of at an
    arbitrary multiple of ``warn`` (160 px, 2,000 films: 2.2 times ``warn``).
    """

    warn: float
    refuse: float
    warn_rule: str = f"quantile {WARN_QUANTILE} of clean validation scores"
    refuse_rule: str = f"quantile {REFUSE_QUANTILE} of stress-tested validation scores (pooled)"
    n_val: int = 0
    n_stressed: int = 0
    """Stress-tested images the refuse level came from (validation films x tests)."""
    stress_tests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("warn", "refuse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"levels.{name} must be a finite number, got {value!r}")
        if not 0 <= self.warn <= self.refuse:
            raise ValueError(f"levels.refuse ({self.refuse!r}) must be >= levels.warn "
                             f"({self.warn!r}) >= 0")
        object.__setattr__(self, "stress_tests", tuple(self.stress_tests))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stress_tests"] = list(self.stress_tests)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateLevels:
        if not isinstance(d, Mapping):
            raise ValueError(f"levels must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        missing = [k for k in ("warn", "refuse") if k not in d]
        if unknown or missing:
            raise ValueError(f"levels has unknown field(s) {unknown} / lacks {missing}")
        return cls(**d)


def choose_levels(val_scores: np.ndarray, stressed_scores: Mapping[str, np.ndarray], *,
                  warn_quantile: float = WARN_QUANTILE,
                  refuse_quantile: float = REFUSE_QUANTILE) -> GateLevels:
    """The :class:`GateLevels` from validation scores and the same films' stress-tested scores
    (``{stress test: scores}``). Uses validation only: call it before looking at any OOD image."""
    val_scores = np.asarray(val_scores, dtype=np.float64)
    if val_scores.size == 0 or not np.isfinite(val_scores).all():
        raise ValueError("choose_levels needs finite validation scores")
    if not stressed_scores:
        raise ValueError("choose_levels needs stress-tested validation scores for the refuse level")
    pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in stressed_scores.values()])
    warn = float(np.quantile(val_scores, warn_quantile))
    refuse = max(warn, float(np.quantile(pooled, refuse_quantile)))
    return GateLevels(warn, refuse, f"quantile {warn_quantile} of clean validation scores",
                      f"quantile {refuse_quantile} of stress-tested validation scores (pooled)",
                      int(val_scores.size), int(pooled.size), tuple(stressed_scores))


@dataclass
class Gate:
    """The input gate in front of a classifier.

    Three states (:attr:`state`): ``fitted`` (checks and score), ``not-fitted`` (a checkpoint
    written before the gate existed: deterministic checks only, ``ood_score`` None) and
    ``disabled`` (``--no-gate``: every image ``ok``, nothing checked).
    """

    scorer: OODScorer | None = None
    levels: GateLevels | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)
    image_size: int | None = None
    """Side of the resized batch the score was fitted on (the classifier's input size)."""
    n_fitted: int = 0
    enabled: bool = True

    def __post_init__(self) -> None:
        if (self.scorer is None) != (self.levels is None):
            raise ValueError("a gate needs both a fitted scorer and its levels, or neither")
        if self.scorer is not None and self.image_size is None:
            raise ValueError("a fitted gate needs the image_size it was fitted at")

    @classmethod
    def disabled(cls) -> Gate:
        """A gate that passes everything (``--no-gate``)."""
        return cls(enabled=False)

    @classmethod
    def unfitted(cls, tolerances: Tolerances = DEFAULT_TOLERANCES) -> Gate:
        """Deterministic checks only: for checkpoints that carry no fitted gate."""
        return cls(tolerances=tolerances)

    @property
    def fitted(self) -> bool:
        return self.enabled and self.scorer is not None

    @property
    def state(self) -> str:
        """``fitted``, ``not-fitted`` or ``disabled`` (for logs, reports and the web page)."""
        return "disabled" if not self.enabled else "fitted" if self.fitted else "not-fitted"

    def to(self, device: str | torch.device) -> Gate:
        if self.scorer is not None:
            self.scorer.to(device)
        return self

    def scores(self, resized: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray | None:
        """OOD scores of the uint8 (N, S, S) batch the classifier gets; None when not fitted."""
        if not self.fitted:
            return None
        assert self.scorer is not None
        if tuple(resized.shape[1:]) != (self.image_size, self.image_size):
            raise ValueError(f"the gate was fitted on {self.image_size}x{self.image_size} images, "
                             f"got a batch of shape {tuple(resized.shape)}")
        return self.scorer.score(resized, batch_size)

    def decide(self, reasons: Sequence[str], score: float | None) -> Verdict:
        """The verdict for one image from its failed checks and its score (the gate's rule)."""
        reasons = list(reasons)
        status: Status = "refuse" if reasons else "ok"
        if score is not None and self.levels is not None:
            if not math.isfinite(score):
                reasons.append("ood-score-not-finite")
                status = "refuse"
            elif score > self.levels.refuse:
                reasons.append("ood-score-above-refuse")
                status = "refuse"
            elif score > self.levels.warn:
                reasons.append("ood-score-above-warn")
                status = "refuse" if status == "refuse" else "warn"
        return Verdict(status, tuple(reasons), score)

    def assess(self, images: Sequence[DecodedImage],
               resized_batch: np.ndarray | torch.Tensor) -> list[Verdict]:
        """One :class:`Verdict` per image. ``resized_batch`` is the uint8 (N, S, S) batch the
        classifier gets (reused: the score costs one forward pass of the frozen extractor)."""
        if len(images) != len(resized_batch):
            raise ValueError(f"assess got {len(images)} images but {len(resized_batch)} resized ones")
        if not self.enabled:
            return [Verdict("ok") for _ in images]
        pixels = (resized_batch.cpu().numpy() if isinstance(resized_batch, torch.Tensor)
                  else np.asarray(resized_batch))
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(f"assess expects a uint8 (N, S, S) batch, got {pixels.dtype} {pixels.shape}")
        scores = self.scores(resized_batch) if len(images) else None
        return [self.decide(check_image(img, px, self.tolerances),
                            None if scores is None else float(scores[i]))
                for i, (img, px) in enumerate(zip(images, pixels, strict=True))]

    # --- state inside a checkpoint ---------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The gate's tensors under :data:`GATE_PREFIX`: the frozen extractor's weights (so the
        model file carries its own gate) and the fitted mean and precision. Empty when not fitted."""
        if self.scorer is None:
            return {}
        return {GATE_PREFIX + k: v.detach().cpu().contiguous()
                for k, v in self.scorer.state_dict().items()}

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of the gate (levels, feature spec, tolerances, ...)."""
        meta: dict[str, Any] = {"format": GATE_FORMAT, "version": __version__, "state": self.state,
                                "tolerances": self.tolerances.to_dict()}
        if self.scorer is not None and self.levels is not None:
            meta.update({"levels": self.levels.to_dict(), "feature_spec": self.scorer.spec.to_dict(),
                         "score": "squared Mahalanobis distance, Ledoit-Wolf covariance, one Gaussian",
                         "dim": self.scorer.dim, "image_size": self.image_size,
                         "n_fitted": self.n_fitted})
        return meta

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, Any] | None) -> Gate:
        """Rebuild a gate from :meth:`to_tensors` (other keys are ignored, so a checkpoint's
        whole tensor dict may be passed) and :meth:`metadata`. ``metadata`` None (a checkpoint
        without a gate) gives :meth:`unfitted`. Raises ``ValueError`` naming the bad field."""
        if metadata is None:
            return cls.unfitted()
        if not isinstance(metadata, Mapping):
            raise ValueError(f"gate metadata must be a mapping, got {type(metadata).__name__}")
        if metadata.get("format") != GATE_FORMAT:
            raise ValueError(f"gate.format: unsupported gate format {metadata.get('format')!r} "
                             f"(expected {GATE_FORMAT})")
        tolerances = metadata.get("tolerances", {})
        tolerances = Tolerances.from_dict(dict(tolerances) if isinstance(tolerances, Mapping) else tolerances)
        state = metadata.get("state")
        if state == "disabled":
            return cls.disabled()
        if state == "not-fitted":
            return cls.unfitted(tolerances)
        if state != "fitted":
            raise ValueError(f"gate.state must be fitted, not-fitted or disabled, got {state!r}")
        for key in ("levels", "feature_spec", "image_size", "n_fitted", "dim"):
            if key not in metadata:
                raise ValueError(f"gate.{key} is missing from the metadata of a fitted gate")
        levels = GateLevels.from_dict(metadata["levels"])
        spec = FeatureSpec.from_dict(metadata["feature_spec"])
        for key, low in (("image_size", 16), ("n_fitted", 2), ("dim", 1)):
            value = metadata[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"gate.{key} must be an integer >= {low}, got {value!r}")
        scorer = OODScorer(spec, pretrained=False)
        if scorer.dim != metadata["dim"]:
            raise ValueError(f"gate.dim is {metadata['dim']} but feature_spec gives {scorer.dim}")
        own = {k[len(GATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(GATE_PREFIX)}
        expected = scorer.state_dict()
        missing = sorted(set(expected) - set(own))
        unexpected = sorted(set(own) - set(expected))
        bad = [k for k in expected if k in own and own[k].shape != expected[k].shape]
        if missing or unexpected or bad:
            raise ValueError(f"gate tensors do not fit gate.feature_spec: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shape {bad[:3]} "
                             f"({len(missing)}/{len(unexpected)}/{len(bad)} in all)")
        scorer.load_state_dict(own, strict=True)
        return cls(scorer.eval(), levels, tolerances, metadata["image_size"], metadata["n_fitted"])


def pop_gate_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the gate's tensors from a checkpoint's tensor dict (in place) and return them, so
    the rest loads strictly into the classifier."""
    keys = [k for k in tensors if k.startswith(GATE_PREFIX)]
    return {k: tensors.pop(k) for k in keys}


def _check_batch(name: str, images: np.ndarray, image_size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (image_size, image_size):
        raise ValueError(f"{name} must be uint8 (N, {image_size}, {image_size}), got "
                         f"{images.dtype} {images.shape}")
    return images


def fit_gate(train_images: np.ndarray, val_images: np.ndarray, *, image_size: int,
             max_train: int = 2000, max_stress: int = 500, stress_tests: Sequence[str] | None = None,
             spec: FeatureSpec = DEFAULT_FEATURES, tolerances: Tolerances = DEFAULT_TOLERANCES,
             batch_size: int = 64, seed: int = 0, device: str | torch.device = "cpu") -> Gate:
    """Fit a gate on training films and set its levels on validation films.

    ``train_images``/``val_images``: uint8 (N, S, S) at the classifier's ``image_size``, from
    the training split and the patient-grouped validation split (never the test split).
    At most ``max_train`` training films fit the Gaussian and at most ``max_stress``
    validation films are stress-tested (random subsets, ``seed``); every validation film sets
    the warn level. Needs the offline package weights of ``spec`` (``pneumoscope[lite0]``).
    """
    from pneumoscope.evaluation.stress import STRESS_TESTS, perturb

    train_images = _check_batch("train_images", train_images, image_size)
    val_images = _check_batch("val_images", val_images, image_size)
    if len(val_images) < 2:
        raise ValueError(f"fit_gate needs at least 2 validation images, got {len(val_images)}")
    rng = np.random.default_rng(seed)

    def subset(images: np.ndarray, n: int) -> np.ndarray:
        keep = np.sort(rng.choice(len(images), n, replace=False)) if len(images) > n else slice(None)
        return np.ascontiguousarray(images[keep])

    train = subset(train_images, max_train)
    scorer = OODScorer(spec).to(device).fit(train, batch_size=batch_size)
    val_scores = scorer.score(np.ascontiguousarray(val_images), batch_size)
    stressed_val = subset(val_images, max_stress)
    stressed = {}
    for name in stress_tests or STRESS_TESTS:
        stressed[name] = scorer.score(perturb(stressed_val, name), batch_size)
        log.info("gate levels: validation under %s scored (%d images)", name, len(stressed_val))
    levels = choose_levels(val_scores, stressed)
    log.info("gate fitted on %d training films: warn above %.1f, refuse above %.1f (%.2fx warn)",
             len(train), levels.warn, levels.refuse, levels.refuse / max(levels.warn, 1e-12))
    return Gate(scorer, levels, tolerances, image_size, len(train))
