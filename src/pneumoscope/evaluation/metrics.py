"""Binary classification metrics for pneumonia (label 1) versus normal (label 0).

All metrics are computed by one vectorised routine, :class:`_WeightedMetrics`, that takes a
matrix of per-sample weights (one row per evaluation). A plain evaluation is one row of ones; a
bootstrap resample is one row of draw counts. Sorting and binning are done once per data set, so
thousands of resamples cost a few matrix products instead of thousands of scikit-learn calls.
The results agree with scikit-learn to floating-point rounding (see the tests).

Conventions:

* ``y_pred = y_prob >= threshold``.
* A ratio whose denominator is zero is NaN (no warning); ROC AUC and PR AUC with a class absent
  are NaN with a :class:`DegenerateInputWarning`.
* ``pr_auc`` is average precision as scikit-learn defines it (step-wise, no interpolation).
* Calibration bins are equal-width on [0, 1] and right-closed, ``(a, b]``, with 0 in the first
  bin: the same binning as :func:`sklearn.calibration.calibration_curve`.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

METRIC_NAMES: tuple[str, ...] = (
    "auc",
    "pr_auc",
    "accuracy",
    "balanced_accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "npv",
    "f1",
    "log_loss",
    "brier",
    "ece",
)
"""Every metric :func:`binary_metrics` returns, in the order reports use."""

LOG_LOSS_EPS: float = 1e-7
"""Probabilities are clipped to ``[eps, 1 - eps]`` before the log loss (a 0 or 1 is finite)."""

_RANKING_METRICS = frozenset({"auc", "pr_auc"})


class DegenerateInputWarning(UserWarning):
    """A metric is undefined for this input (e.g. ROC AUC with only one class present)."""


def _as_1d(values: ArrayLike, name: str) -> NDArray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _as_labels(values: ArrayLike, name: str) -> NDArray:
    arr = _as_1d(values, name)
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        found = np.unique(arr[bad])[:5].tolist()
        raise ValueError(f"{name} must contain only labels 0 and 1, found {found}")
    return arr.astype(np.int8)


def _same_length(a: NDArray, b: NDArray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same length, got {a.shape[0]} and {b.shape[0]}"
        )


def _as_probabilities(values: ArrayLike, name: str) -> NDArray:
    p = _as_1d(values, name).astype(np.float64, copy=False)
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{p.min():.6g}, {p.max():.6g}]")
    return p


def _validate_inputs(
    y_true: ArrayLike, y_prob: ArrayLike, prob_name: str = "y_prob"
) -> tuple[NDArray, NDArray]:
    """Return ``(labels as int8, probabilities as float64)`` or raise ``ValueError``."""
    y = _as_labels(y_true, "y_true")
    p = _as_probabilities(y_prob, prob_name)
    _same_length(y, p, "y_true", prob_name)
    return y, p


def _validate_threshold(threshold: float) -> float:
    t = float(threshold)
    if not np.isfinite(t):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return t


def _validate_n_bins(n_bins: int) -> int:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _bin_index(y_prob: NDArray, n_bins: int) -> NDArray:
    """Equal-width bin of each probability; bins are ``(a, b]`` with 0 in bin 0 (sklearn's)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], y_prob, side="left")


def _warn_degenerate(n_pos: float, n_neg: float, names: str) -> None:
    missing = "positive (1)" if n_pos == 0 else "negative (0)"
    warnings.warn(
        f"no {missing} samples: {names} undefined, returning NaN",
        DegenerateInputWarning,
        stacklevel=3,
    )


class _WeightedMetrics:
    """Every metric of one data set, for many weight vectors at once.

    The data are sorted and binned once here; :meth:`compute` then handles a ``(B, n)`` weight
    matrix (row ``b`` = how often each sample counts in evaluation ``b``). With integer weights
    all sums are exact, so a row of ones reproduces the unweighted metrics exactly.
    """

    def __init__(self, y: NDArray, p: NDArray, threshold: float, n_bins: int = 15) -> None:
        self.n = y.shape[0]
        yf = y.astype(np.float64)
        pred = p >= threshold
        self.pos_pred = yf * pred  # a true positive where weight > 0
        self.neg_pred = (1.0 - yf) * pred  # a false positive
        self.yf = yf

        # Ranking metrics: ascending order, grouped into runs of tied scores.
        self.order = np.argsort(p, kind="mergesort")
        ps = p[self.order]
        self.y_sorted = yf[self.order]
        self.group_starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])

        pc = np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
        self.log_loss_terms = -(yf * np.log(pc) + (1.0 - yf) * np.log1p(-pc))
        self.brier_terms = (p - yf) ** 2

        # ECE = sum over bins |sum(p - y) in bin| / n: one (n, n_bins) matrix product.
        self.gap_by_bin = np.zeros((self.n, n_bins))
        self.gap_by_bin[np.arange(self.n), _bin_index(p, n_bins)] = p - yf

    def compute(
        self, weights: NDArray, names: tuple[str, ...] = METRIC_NAMES
    ) -> dict[str, NDArray]:
        """Metric name -> array of shape ``(B,)``, one value per weight row (NaN if undefined)."""
        w = np.asarray(weights, dtype=np.float64)
        out: dict[str, NDArray] = {}
        n_pos = w @ self.yf
        n_tot = w.sum(axis=1)
        n_neg = n_tot - n_pos
        with np.errstate(divide="ignore", invalid="ignore"):
            if _RANKING_METRICS.intersection(names):
                auc, ap = self._ranking(w, n_pos, n_neg)
                out["auc"], out["pr_auc"] = auc, ap
            if _RANKING_METRICS.issuperset(names):
                return {k: out[k] for k in names}
            tp = w @ self.pos_pred
            fp = w @ self.neg_pred
            fn = n_pos - tp
            tn = n_neg - fp
            sens = tp / n_pos
            spec = tn / n_neg
            out["accuracy"] = (tp + tn) / n_tot
            out["balanced_accuracy"] = 0.5 * (sens + spec)
            out["precision"] = tp / (tp + fp)
            out["sensitivity"] = sens
            out["specificity"] = spec
            out["npv"] = tn / (tn + fn)
            out["f1"] = 2.0 * tp / (2.0 * tp + fp + fn)
            out["log_loss"] = (w @ self.log_loss_terms) / n_tot
            out["brier"] = (w @ self.brier_terms) / n_tot
            out["ece"] = np.abs(w @ self.gap_by_bin).sum(axis=1) / n_tot
        return {k: out[k] for k in names}

    def _ranking(self, w: NDArray, n_pos: NDArray, n_neg: NDArray) -> tuple[NDArray, NDArray]:
        ws = w[:, self.order]
        pos_g = np.add.reduceat(ws * self.y_sorted, self.group_starts, axis=1)
        neg_g = np.add.reduceat(ws * (1.0 - self.y_sorted), self.group_starts, axis=1)
        # Mann-Whitney: each positive beats the negatives strictly below it, ties count 0.5.
        neg_below = np.cumsum(neg_g, axis=1) - neg_g
        auc = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1) / (n_pos * n_neg)
        # Average precision: walk thresholds from the top; recall steps by pos_g / n_pos.
        pos_desc = pos_g[:, ::-1]
        tp_cum = np.cumsum(pos_desc, axis=1)
        fp_cum = np.cumsum(neg_g[:, ::-1], axis=1)
        precision = np.where(pos_desc > 0, tp_cum / np.maximum(tp_cum + fp_cum, 1e-300), 0.0)
        ap = (pos_desc * precision).sum(axis=1) / n_pos
        # Without negatives AP is trivially 1 and says nothing about ranking: undefined too.
        undefined = (n_pos == 0) | (n_neg == 0)
        auc[undefined] = np.nan
        ap[undefined] = np.nan
        return auc, ap


def confusion_counts(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, int]:
    """Confusion matrix counts ``{"tn", "fp", "fn", "tp"}``; positive class is 1 (pneumonia)."""
    y, pred = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    _same_length(y, pred, "y_true", "y_pred")
    yb, pb = y.astype(bool), pred.astype(bool)
    return {
        "tn": int(np.sum(~yb & ~pb)),
        "fp": int(np.sum(~yb & pb)),
        "fn": int(np.sum(yb & ~pb)),
        "tp": int(np.sum(yb & pb)),
    }


def binary_metrics(
    y_true: ArrayLike, y_prob: ArrayLike, threshold: float = 0.5, n_bins: int = 15
) -> dict[str, float]:
    """Every metric in :data:`METRIC_NAMES` for labels ``y_true`` and scores ``y_prob``.

    Threshold metrics use ``y_prob >= threshold``; ``n_bins`` is for the ECE. A ratio with a
    zero denominator is NaN; AUC and PR AUC with one class absent warn and are NaN.
    """
    y, p = _validate_inputs(y_true, y_prob)
    engine = _WeightedMetrics(y, p, _validate_threshold(threshold), _validate_n_bins(n_bins))
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        _warn_degenerate(n_pos, y.shape[0] - n_pos, "auc and pr_auc")
    values = engine.compute(np.ones((1, y.shape[0])))
    return {name: float(values[name][0]) for name in METRIC_NAMES}


def reliability_curve(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10
) -> tuple[NDArray, NDArray, NDArray]:
    """Per-bin ``(mean_predicted, fraction_positive, counts)`` over ``n_bins`` equal-width bins.

    All ``n_bins`` bins are returned, in order; an empty bin has count 0 and NaN means (plotting
    libraries skip NaN). Dropping empty bins gives sklearn's ``calibration_curve`` output.
    """
    y, p = _validate_inputs(y_true, y_prob)
    n_bins = _validate_n_bins(n_bins)
    idx = _bin_index(p, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_pred = np.where(counts > 0, sum_p / counts, np.nan)
        frac_pos = np.where(counts > 0, sum_y / counts, np.nan)
    return mean_pred, frac_pos, counts


def expected_calibration_error(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 15) -> float:
    """ECE: bin-size-weighted mean of ``|mean predicted - fraction positive|`` over equal bins."""
    y, p = _validate_inputs(y_true, y_prob)
    n_bins = _validate_n_bins(n_bins)
    # sum over bins of n_b/n * |mean(p) - mean(y)| is sum of |sum(p - y)| / n.
    gap = np.bincount(_bin_index(p, n_bins), weights=p - y, minlength=n_bins)
    return float(np.abs(gap).sum() / y.shape[0])
