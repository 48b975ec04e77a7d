"""Uncertainty for the metrics: bootstrap confidence intervals, paired tests, DeLong's test.

A bootstrap resample is represented by how many times each sample was drawn (a row of weights),
so all resamples are scored together by :class:`~pneumoscope.evaluation.metrics._WeightedMetrics`
after sorting the data once. Randomness comes only from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from pneumoscope.evaluation.metrics import (
    METRIC_NAMES,
    DegenerateInputWarning,
    _validate_inputs,
    _validate_n_bins,
    _validate_threshold,
    _WeightedMetrics,
)

# Resamples are scored in blocks of about this many (resample, sample) cells to bound memory.
_CELLS_PER_BLOCK = 2_000_000


def _validate_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return c


def _validate_n_resamples(n_resamples: int) -> int:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    return int(n_resamples)


def _weight_blocks(
    rng: np.random.Generator, y: NDArray, n_resamples: int, stratified: bool
) -> Iterator[NDArray]:
    """Yield ``(rows, n)`` draw-count matrices, ``n_resamples`` rows in all.

    Stratified: positives and negatives are each drawn with replacement at their own count, so
    every resample keeps the prevalence and both classes.
    """
    n = y.shape[0]
    groups = [np.flatnonzero(y == 1), np.flatnonzero(y == 0)] if stratified else [np.arange(n)]
    block = max(1, _CELLS_PER_BLOCK // n)
    done = 0
    while done < n_resamples:
        rows = min(block, n_resamples - done)
        draws = np.concatenate(
            [g[rng.integers(0, g.shape[0], size=(rows, g.shape[0]))] for g in groups if g.size],
            axis=1,
        )
        # One bincount for the whole block: offset each row into its own range of n cells.
        flat = (draws + (np.arange(rows) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)
        done += rows


def _percentile_ci(values: NDArray, confidence: float) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - confidence
    low, high = np.percentile(finite, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return (float(low), float(high))


def _warn_dropped(values: dict[str, NDArray]) -> None:
    """Warn where some (not all) resamples left a metric undefined: its CI uses the rest."""
    dropped = {k: int(np.isnan(v).sum()) for k, v in values.items()}
    partial = {k: c for k, c in dropped.items() if 0 < c < values[k].shape[0]}
    if partial:
        detail = ", ".join(f"{k}: {c}" for k, c in partial.items())
        warnings.warn(
            f"metric undefined in some resamples, CI uses the others ({detail})",
            DegenerateInputWarning,
            stacklevel=3,
        )


def _is_degenerate(y: NDArray) -> bool:
    n_pos = int(y.sum())
    return n_pos == 0 or n_pos == y.shape[0]


def bootstrap_ci(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    stratified: bool = True,
    n_bins: int = 15,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI ``(low, high)`` for every metric in :data:`METRIC_NAMES`.

    ``stratified`` resamples positives and negatives separately (prevalence kept, never a
    one-class resample). Unstratified resamples that leave a metric undefined are dropped from
    that metric's CI, with a warning. One class only: warns and returns NaN intervals.
    """
    y, p = _validate_inputs(y_true, y_prob)
    threshold = _validate_threshold(threshold)
    n_resamples = _validate_n_resamples(n_resamples)
    confidence = _validate_confidence(confidence)
    n_bins = _validate_n_bins(n_bins)
    if _is_degenerate(y):
        warnings.warn(
            "only one class present: bootstrap intervals undefined, returning NaN",
            DegenerateInputWarning,
            stacklevel=2,
        )
        return {name: (math.nan, math.nan) for name in METRIC_NAMES}

    engine = _WeightedMetrics(y, p, threshold, n_bins)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[NDArray]] = {name: [] for name in METRIC_NAMES}
    for weights in _weight_blocks(rng, y, n_resamples, stratified):
        for name, vals in engine.compute(weights).items():
            parts[name].append(vals)
    values = {name: np.concatenate(v) for name, v in parts.items()}
    _warn_dropped(values)
    return {name: _percentile_ci(values[name], confidence) for name in METRIC_NAMES}


def paired_bootstrap(
    y_true: ArrayLike,
    prob_a: ArrayLike,
    prob_b: ArrayLike,
    metric: str = "auc",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    threshold_a: float = 0.5,
    threshold_b: float = 0.5,
    stratified: bool = True,
) -> dict[str, Any]:
    """Paired bootstrap of ``metric(a) - metric(b)``: both models are scored on the same resamples.

    Returns ``difference`` (on the full data), ``ci`` (percentile), ``p_value`` (two-sided: twice
    the share of resamples whose difference has the opposite sign or is zero, with the
    ``(count + 1) / (n + 1)`` correction, capped at 1; 1.0 when the difference is exactly 0) and
    ``n_resamples`` (resamples where the difference was defined).
    """
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")
    y, pa = _validate_inputs(y_true, prob_a, "prob_a")
    _, pb = _validate_inputs(y_true, prob_b, "prob_b")
    n_resamples = _validate_n_resamples(n_resamples)
    confidence = _validate_confidence(confidence)
    engine_a = _WeightedMetrics(y, pa, _validate_threshold(threshold_a))
    engine_b = _WeightedMetrics(y, pb, _validate_threshold(threshold_b))
    names = (metric,)

    ones = np.ones((1, y.shape[0]))
    observed = float(
        engine_a.compute(ones, names)[metric][0] - engine_b.compute(ones, names)[metric][0]
    )
    if math.isnan(observed):
        warnings.warn(
            f"{metric} is undefined on these data (one class, or a zero denominator): "
            "returning NaN",
            DegenerateInputWarning,
            stacklevel=2,
        )
        nan = math.nan
        return {"difference": nan, "ci": (nan, nan), "p_value": nan, "n_resamples": 0}

    rng = np.random.default_rng(seed)
    parts = []
    for weights in _weight_blocks(rng, y, n_resamples, stratified):
        # The same weight rows for both models: that is what makes the comparison paired.
        parts.append(
            engine_a.compute(weights, names)[metric] - engine_b.compute(weights, names)[metric]
        )
    diffs = np.concatenate(parts)
    _warn_dropped({metric: diffs})
    diffs = diffs[~np.isnan(diffs)]

    if observed == 0.0 or diffs.size == 0:
        p_value = 1.0
    else:
        flipped = int(np.sum(diffs <= 0.0)) if observed > 0 else int(np.sum(diffs >= 0.0))
        p_value = min(1.0, 2.0 * (flipped + 1) / (diffs.size + 1))
    return {
        "difference": observed,
        "ci": _percentile_ci(diffs, confidence),
        "p_value": p_value,
        "n_resamples": int(diffs.size),
    }


def _midranks(x: NDArray) -> NDArray:
    """1-based ranks of ``x`` with ties given their average rank."""
    return rankdata(x, method="average")


def _delong_components(pos: NDArray, neg: NDArray) -> tuple[float, NDArray, NDArray]:
    """AUC and its structural components (Sun & Xu 2014) from midranks.

    ``v01[i]``: share of negatives scored below positive ``i`` (ties 0.5); ``v10[j]``: share of
    positives scored above negative ``j``. Their means both equal the AUC.
    """
    m, n = pos.shape[0], neg.shape[0]
    tz = _midranks(np.concatenate([pos, neg]))
    v01 = (tz[:m] - _midranks(pos)) / n
    v10 = 1.0 - (tz[m:] - _midranks(neg)) / m
    auc = (tz[:m].sum() / m - (m + 1) / 2.0) / n
    return float(auc), v01, v10


def delong_test(
    y_true: ArrayLike, prob_a: ArrayLike, prob_b: ArrayLike, confidence: float = 0.95
) -> dict[str, float | tuple[float, float]]:
    """DeLong's test for two correlated ROC AUCs on the same cases (fast algorithm, Sun & Xu).

    Returns ``auc_a``, ``auc_b``, ``difference`` (a - b), ``z``, two-sided ``p_value`` and ``ci``
    (normal-approximation CI of the difference). Identical rankings have zero variance: z = 0,
    p = 1. Fewer than two samples of a class: warns, statistics are NaN.
    """
    y, pa = _validate_inputs(y_true, prob_a, "prob_a")
    _, pb = _validate_inputs(y_true, prob_b, "prob_b")
    confidence = _validate_confidence(confidence)
    is_pos = y == 1
    m, n = int(is_pos.sum()), int((~is_pos).sum())
    nan = math.nan
    if min(m, n) < 2:
        warnings.warn(
            f"DeLong's test needs at least 2 samples of each class, got {m} positive and "
            f"{n} negative: returning NaN",
            DegenerateInputWarning,
            stacklevel=2,
        )
        return {
            "auc_a": nan,
            "auc_b": nan,
            "difference": nan,
            "z": nan,
            "p_value": nan,
            "ci": (nan, nan),
        }

    auc_a, v01_a, v10_a = _delong_components(pa[is_pos], pa[~is_pos])
    auc_b, v01_b, v10_b = _delong_components(pb[is_pos], pb[~is_pos])
    diff = auc_a - auc_b
    # Var(a - b) = L S L' with L = [1, -1]; taking variances of the component differences
    # directly gives the same number, and exactly 0 for identical rankings.
    var = np.var(v01_a - v01_b, ddof=1) / m + np.var(v10_a - v10_b, ddof=1) / n
    se = math.sqrt(max(float(var), 0.0))
    z_crit = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    if se <= 1e-12:
        if abs(diff) <= 1e-12:
            z, p_value = 0.0, 1.0
        else:
            # E.g. a perfect ranker against a constant one: the normal approximation is void.
            warnings.warn(
                f"AUC difference {diff:.4g} with zero variance: DeLong's test is undefined, "
                "z and p_value are NaN",
                DegenerateInputWarning,
                stacklevel=2,
            )
            z, p_value = nan, nan
    else:
        z = diff / se
        p_value = math.erfc(abs(z) / math.sqrt(2.0))
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "difference": diff,
        "z": z,
        "p_value": p_value,
        "ci": (diff - z_crit * se, diff + z_crit * se),
    }
