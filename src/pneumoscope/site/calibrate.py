"""Recalibrate a checkpoint on a new site's labelled films: temperature and threshold.

A model's probabilities and its validation-chosen threshold are tied to the films it was
validated on. At another hospital (other scanners, exposure, population) both drift: the
threshold that gave 95 % sensitivity there may give 85 % here. :func:`calibrate_checkpoint`
refits them on a small labelled local set and writes a new self-describing checkpoint that
records what was done (``CheckpointInfo.provenance``).

* **Temperature scaling** (optional): one scalar ``T > 0`` dividing the logit, fitted by
  minimising the negative log-likelihood of the site labels. It changes the probabilities (their
  calibration: log loss, ECE), never the ranking, so AUC and the films on either side of a
  threshold are unchanged.
* **Threshold**: :func:`~pneumoscope.evaluation.threshold.choose_threshold` (Youden's J, or the
  highest threshold reaching a target sensitivity) on the calibrated site probabilities.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.evaluation.bootstrap import bootstrap_ci
from pneumoscope.evaluation.metrics import binary_metrics, confusion_counts
from pneumoscope.evaluation.selective import band_metrics, choose_abstain_band
from pneumoscope.evaluation.threshold import THRESHOLD_METHODS, choose_threshold
from pneumoscope.evaluation.tta import resolve_tta
from pneumoscope.jsonio import json_safe
from pneumoscope.models.checkpoint import load_checkpoint, read_extra_tensors, save_checkpoint
from pneumoscope.site.common import (
    check_output,
    fingerprint,
    load_labelled,
    predict_logits,
    probabilities,
    provenance_entry,
)

log = logging.getLogger(__name__)

MIN_FILMS_PER_CLASS = 50
"""Below this many films of either class the site numbers are too uncertain to lean on: e.g.
with 25 pneumonia films at 95 % sensitivity a single miss moves sensitivity by 4 points and the
95 % interval spans about ±8 points. Calibration still runs, with a :class:`SmallSiteWarning`."""

TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
"""Search range for T; a fit at a bound means the site films are (nearly) separable or the
logits carry no information, and is reported."""

REPORTED = ("accuracy", "sensitivity", "specificity", "precision", "npv", "auc", "log_loss",
            "brier", "ece")


class SmallSiteWarning(UserWarning):
    """The site set is too small for the confidence the reported numbers suggest."""


@dataclass(frozen=True)
class Calibration:
    """A fitted operating point: probabilities are ``sigmoid(logit / temperature)`` and the
    positive call is ``probability >= threshold``."""

    temperature: float
    threshold: float
    method: str
    target_sensitivity: float | None = None

    @property
    def label(self) -> str:
        """Short form stored as ``threshold_method``: ``target_sensitivity=0.95@site``."""
        return self.method + (f"={self.target_sensitivity:g}" if self.target_sensitivity else "") + "@site"


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate_checkpoint` did; ``before``/``after`` are in-sample (see there)."""

    out: Path
    calibration: Calibration
    previous_threshold: float
    previous_temperature: float
    n_normal: int
    n_pneumonia: int
    fingerprint: str
    before: dict[str, Any]
    after: dict[str, Any]
    warnings: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (for ``--json`` output or a report)."""
        return json_safe({**asdict(self), "out": str(self.out)})


def resolve_method(method: str | None, target_sensitivity: float | None) -> str:
    """``None`` means target sensitivity when one is given, else Youden; checks both early."""
    if method is None:
        method = "target_sensitivity" if target_sensitivity is not None else "youden"
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; expected one of {THRESHOLD_METHODS}")
    if method == "target_sensitivity" and not (
            target_sensitivity is not None and 0.0 < float(target_sensitivity) <= 1.0):
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity!r}")
    return method


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The ``T`` in ``bounds`` minimising the mean NLL of ``labels`` under ``sigmoid(logits/T)``.

    In ``a = 1/T`` the NLL is convex with derivative ``mean(z * (sigmoid(a z) - y))``, which
    increases with ``a``: bisection on its sign (in log a) finds the minimum to float precision,
    deterministically and without an optimiser. A minimum outside ``bounds`` is clipped with a
    warning (separable films push T to 0; uninformative logits push it to infinity).
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.shape != y.shape or z.size == 0:
        raise ValueError(f"logits and labels must be non-empty and of equal length, got "
                         f"{z.size} and {y.size}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    t_min, t_max = bounds
    if not 0.0 < t_min < t_max:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")

    def slope(log_a: float) -> float:
        s = 0.5 * (1.0 + np.tanh(0.5 * math.exp(log_a) * z))  # a stable sigmoid
        return float(np.mean(z * (s - y)))

    lo, hi = math.log(1.0 / t_max), math.log(1.0 / t_min)
    if slope(lo) >= 0.0:
        warnings.warn(f"temperature fit reached the upper bound T = {t_max:g}: the logits carry "
                      "almost no information about these labels", UserWarning, stacklevel=2)
        return float(t_max)
    if slope(hi) <= 0.0:
        warnings.warn(f"temperature fit reached the lower bound T = {t_min:g}: the films are "
                      "(nearly) separated by the model, so NLL keeps falling as T -> 0",
                      UserWarning, stacklevel=2)
        return float(t_min)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if slope(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return float(math.exp(-0.5 * (lo + hi)))


def fit_calibration(logits: np.ndarray, labels: np.ndarray, *, method: str | None = None,
                    target_sensitivity: float | None = None, temperature: bool = False,
                    current_temperature: float = 1.0) -> Calibration:
    """Temperature (refitted when ``temperature``, else kept; also kept, with a warning, when
    the films are separable and T is not identified) and then the threshold on the resulting
    probabilities: the array-level core of :func:`calibrate_checkpoint`."""
    method = resolve_method(method, target_sensitivity)
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"calibration needs both classes, got only label(s) "
                         f"{np.unique(labels).tolist()} in {len(labels)} films")
    t = float(current_temperature)
    if temperature:
        fitted = fit_temperature(logits, labels)
        if fitted <= TEMPERATURE_BOUNDS[0]:
            # (Nearly) separable films: the NLL keeps falling as T -> 0, so T is not identified
            # and a tiny T would make every probability 0 or 1. Keep the current one.
            warnings.warn(f"temperature not identifiable on these {len(labels)} films (they are "
                          f"separated by the model): keeping T = {t:g}", UserWarning, stacklevel=2)
        else:
            t = fitted
    threshold = choose_threshold(labels, probabilities(logits, t), method,
                                 target_sensitivity if method == "target_sensitivity" else None)
    return Calibration(t, float(threshold), method,
                       target_sensitivity if method == "target_sensitivity" else None)


def site_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float, *,
                 n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics, stratified bootstrap 95 % CIs and the confusion matrix at one threshold."""
    point = binary_metrics(labels, probs, threshold)
    ci = bootstrap_ci(labels, probs, threshold, n_resamples=n_resamples, seed=seed) if n_resamples else {}
    return json_safe({
        "threshold": float(threshold),
        "metrics": {k: point[k] for k in REPORTED},
        "ci95": {k: ci[k] for k in REPORTED if k in ci},
        "confusion": confusion_counts(labels, (probs >= threshold).astype(int)),
    })


def _half_width(point: dict[str, Any], name: str) -> float:
    low, high = point["ci95"].get(name, (None, None))
    return math.nan if low is None or high is None else (high - low) / 2.0


def small_site_messages(n_normal: int, n_pneumonia: int, after: dict[str, Any]) -> list[str]:
    """Plain-language warnings when the site set cannot support the numbers it produced."""
    if min(n_normal, n_pneumonia) >= MIN_FILMS_PER_CLASS:
        return []
    sens_hw, spec_hw = _half_width(after, "sensitivity"), _half_width(after, "specificity")
    return [
        f"small site set: {n_pneumonia} PNEUMONIA and {n_normal} NORMAL films (fewer than "
        f"{MIN_FILMS_PER_CLASS} per class). The 95% CI half-width is ±{sens_hw:.3f} for "
        f"sensitivity and ±{spec_hw:.3f} for specificity at the new threshold, and one film "
        f"moves sensitivity by {1.0 / max(n_pneumonia, 1):.3f}: treat the threshold as "
        f"provisional and collect at least {MIN_FILMS_PER_CLASS} films per class."
    ]


def calibrate_checkpoint(
    checkpoint: str | Path, data_dir: str | Path, *, out: str | Path, method: str | None = None,
    target_sensitivity: float | None = None, temperature: bool = False, n_resamples: int = 1000,
    seed: int = 0, split: str | None = None, cache_dir: str | Path | None = None,
    batch_size: int = 64, command: str | None = None, overwrite: bool = False,
    abstain_accuracy: float | None = None, abstain_npv: float | None = None,
) -> CalibrationResult:
    """Refit the threshold (and with ``temperature`` the temperature) of ``checkpoint`` on the
    labelled films of ``data_dir`` and write the result to ``out``, a new checkpoint.

    ``method``: ``"youden"`` or ``"target_sensitivity"`` (with ``target_sensitivity``, e.g.
    0.95); by default the latter when a target is given. ``data_dir`` is any NORMAL/PNEUMONIA
    tree the record reader accepts (``split`` picks one split of a train/val/test tree; by
    default all films). The input file is never modified (``out`` equal to it is refused; an
    existing ``out`` only with ``overwrite``). ``command`` is recorded in the provenance (by
    default the process's command line).

    The returned ``before``/``after`` metrics (bootstrap CIs over ``n_resamples``) are measured
    on the same films the threshold was chosen on: they are in-sample and optimistic, most of
    all for small sets. For honest numbers, hold films out: ``benchmarks/site.py`` scores each
    choice on a disjoint evaluation half. Sets with fewer than :data:`MIN_FILMS_PER_CLASS`
    films of a class raise a :class:`SmallSiteWarning` that states the CI widths.

    ``abstain_accuracy`` / ``abstain_npv``: also choose, on the same films, an abstain band
    around the new threshold (:func:`~pneumoscope.evaluation.selective.choose_abstain_band`):
    the widest coverage whose accepted calls meet the target; films inside it are labelled
    "uncertain" by predict and serve. Stored as ``abstain_band`` in the new file.
    """
    checkpoint, out, data_dir = Path(checkpoint), Path(out), Path(data_dir)
    check_output(checkpoint, out, overwrite)
    method = resolve_method(method, target_sensitivity)
    model, info = load_checkpoint(checkpoint)
    decoded = load_labelled(data_dir, info.preprocessing.image_size, split=split, cache_dir=cache_dir)
    labels = decoded.labels
    n_pneumonia = int(labels.sum())
    n_normal = len(labels) - n_pneumonia
    if n_pneumonia == 0 or n_normal == 0:
        raise ValueError(f"{data_dir}: calibration needs readable NORMAL and PNEUMONIA films, "
                         f"got {n_normal} NORMAL and {n_pneumonia} PNEUMONIA")
    log.info("site %s: %d NORMAL, %d PNEUMONIA films", data_dir, n_normal, n_pneumonia)

    # A threshold chosen under test-time augmentation is re-chosen under the same views: the new
    # file keeps the old one's ``tta``, so predict and serve go on using them.
    logits = predict_logits(model, np.asarray(decoded.images), batch_size=batch_size,
                            tta=resolve_tta(info.tta, None, where=str(checkpoint)))
    cal = fit_calibration(logits, labels, method=method, target_sensitivity=target_sensitivity,
                          temperature=temperature, current_temperature=info.temperature)
    before = site_metrics(labels, probabilities(logits, info.temperature), info.threshold,
                          n_resamples=n_resamples, seed=seed)
    after = site_metrics(labels, probabilities(logits, cal.temperature), cal.threshold,
                         n_resamples=n_resamples, seed=seed)
    band = None
    if abstain_accuracy is not None or abstain_npv is not None:
        band = choose_abstain_band(labels, probabilities(logits, cal.temperature), cal.threshold,
                                   target_accuracy=abstain_accuracy, target_npv=abstain_npv)
        after = {**after, "abstain": band_metrics(labels, probabilities(logits, cal.temperature),
                                                  *band)}
    messages = small_site_messages(n_normal, n_pneumonia, after)
    for message in messages:
        warnings.warn(message, SmallSiteWarning, stacklevel=2)

    digest = fingerprint(data_dir, [r.path for r in decoded.records])
    step = provenance_entry(
        "calibrate", checkpoint, data_dir, command=command,
        site_data={"fingerprint": digest, "n_films": len(labels), "n_normal": n_normal,
                   "n_pneumonia": n_pneumonia, "n_unreadable": len(decoded.failures),
                   "split": split or "all"},
        method=cal.method, target_sensitivity=cal.target_sensitivity,
        fit_temperature=temperature,
        abstain={"band": list(band), "target_accuracy": abstain_accuracy,
                 "target_npv": abstain_npv} if band else None,
        previous={"threshold": info.threshold, "threshold_method": info.threshold_method,
                  "temperature": info.temperature},
        new={"threshold": cal.threshold, "threshold_method": cal.label,
             "temperature": cal.temperature},
        site_metrics={"in_sample": True, "before": before, "after": after},
        warnings=messages,
    )
    new_info = replace(info, threshold=cal.threshold, threshold_method=cal.label,
                       temperature=cal.temperature, provenance=(*info.provenance, step),
                       abstain_band=band, created="")
    model.set_temperature(cal.temperature)
    save_checkpoint(out, model, new_info, extra_tensors=read_extra_tensors(checkpoint))
    log.info("calibrated %s on %s -> %s: threshold %.4g -> %.4g, temperature %.4g -> %.4g",
             checkpoint, data_dir, out, info.threshold, cal.threshold, info.temperature,
             cal.temperature)
    return CalibrationResult(out, cal, info.threshold, info.temperature, n_normal, n_pneumonia,
                             digest, before, after, tuple(messages), step)
