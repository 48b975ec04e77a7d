"""Selective prediction: let the model abstain on the films it is least sure of.

Pure functions of (labels, probabilities, threshold), in the style of
:mod:`pneumoscope.evaluation.metrics`:

* :func:`risk_coverage` ranks films by a confidence score and gives, for each share of films
  accepted (coverage), the error rate among them (risk), plus the area under that curve (AURC,
  lower is better).
* :func:`choose_abstain_band` picks, on validation, a band ``[low, high)`` around the threshold
  whose films are sent to a reader ("uncertain"): the band keeping the most films whose
  accepted calls still meet a target accuracy or NPV. :func:`apply_band` applies it.

Conventions: the positive call is ``prob >= threshold`` as everywhere in PneumoScope; a film
is accepted when its confidence is at least the cut-off, so tied confidences are accepted or
refused together and every result is independent of the input order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from pneumoscope import CLASS_NAMES
from pneumoscope.evaluation.metrics import (
    LOG_LOSS_EPS,
    DegenerateInputWarning,
    _as_1d,
    _as_probabilities,
    _same_length,
    _validate_inputs,
    _validate_threshold,
)

UNCERTAIN = "uncertain"
"""The label :func:`apply_band` gives films inside the abstain band."""

DEFAULT_COVERAGES: tuple[float, ...] = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)

_BLOCK_CELLS = 4_000_000  # band search: (low, high) candidate pairs scored per block


def _logit(p: NDArray) -> NDArray:
    q = np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    return np.log(q) - np.log1p(-q)


def margin_confidence(probs: ArrayLike, threshold: float) -> NDArray:
    """Distance of each probability from the threshold, on the logit scale:
    ``|logit(p) - logit(threshold)|``.

    On the probability scale a threshold of 0.1 would leave normal calls at most 0.1 from it
    and pneumonia calls up to 0.9, so every pneumonia call would outrank every normal one; the
    logit scale (the one temperature scaling acts on) treats both sides alike. Within one side
    the order is the same as the plain probability distance.
    """
    p = _as_probabilities(probs, "probs")
    t = _validate_threshold(threshold)
    if not 0.0 < t < 1.0:
        raise ValueError(f"threshold must be in (0, 1) for a margin, got {threshold!r}")
    return np.abs(_logit(p) - _logit(np.array([t]))[0])


def _rank_share(x: NDArray) -> NDArray:
    """Rank of each value as a share of n (ties: their average rank), in (0, 1]."""
    return rankdata(x, method="average") / x.shape[0]


def selection_score(probs: ArrayLike, threshold: float, ood_score: ArrayLike | None = None) -> NDArray:
    """Confidence for :func:`risk_coverage`: the :func:`margin_confidence`, or, with an
    ``ood_score`` from the input gate (higher = more unusual, any scale), the smaller of the two
    rank shares, so a film is only as trusted as its weaker signal (far from the threshold
    *and* typical of the training films). Rank-based, so the two scales need no matching."""
    margin = margin_confidence(probs, threshold)
    if ood_score is None:
        return margin
    ood = _as_1d(ood_score, "ood_score").astype(np.float64)
    _same_length(margin, ood, "probs", "ood_score")
    if not np.isfinite(ood).all():
        raise ValueError("ood_score contains NaN or infinite values")
    return np.minimum(_rank_share(margin), _rank_share(-ood))


def _confidence(p: NDArray, threshold: float, confidence: ArrayLike | None) -> NDArray:
    if confidence is None:
        return margin_confidence(p, threshold)
    c = _as_1d(confidence, "confidence").astype(np.float64)
    _same_length(p, c, "probs", "confidence")
    if not np.isfinite(c).all():
        raise ValueError("confidence contains NaN or infinite values")
    return c


def risk_coverage(labels: ArrayLike, probs: ArrayLike, threshold: float,
                  confidence: ArrayLike | None = None) -> dict[str, Any]:
    """The risk-coverage curve of the calls ``probs >= threshold`` ranked by ``confidence``
    (higher = more trusted; default :func:`margin_confidence`, see :func:`selection_score` for
    combining it with the gate's OOD score).

    Returns arrays ``coverage`` (share accepted), ``risk`` (error rate among the accepted) and
    ``cutoff`` (accept films with confidence >= cutoff), one entry per distinct confidence from
    the most confident down, and floats ``aurc`` (mean risk over films, each film taking the
    risk at its own cut-off: Geifman et al.'s AURC with ties resolved together),
    ``aurc_optimal`` (AURC of an oracle accepting every correct call first; ``aurc -
    aurc_optimal`` is the excess AURC) and ``risk_full`` (the error rate at full coverage).
    """
    y, p = _validate_inputs(labels, probs, "probs")
    t = _validate_threshold(threshold)
    conf = _confidence(p, t, confidence)
    n = y.shape[0]
    errors = ((p >= t).astype(np.int8) != y).astype(np.int64)
    order = np.argsort(-conf, kind="mergesort")
    cs = conf[order]
    run_ends = np.flatnonzero(np.r_[cs[1:] != cs[:-1], True])
    accepted = run_ends + 1
    risk = np.cumsum(errors[order])[run_ends] / accepted
    run_sizes = np.diff(np.r_[0, accepted])
    n_err = int(errors.sum())
    k = np.arange(1, n + 1)
    oracle = np.maximum(k - (n - n_err), 0) / k
    return {
        "coverage": accepted / n,
        "risk": risk,
        "cutoff": cs[run_ends],
        "aurc": float((run_sizes * risk).sum() / n),
        "aurc_optimal": float(oracle.mean()),
        "risk_full": float(n_err / n),
    }


def _accepted_metrics(y: NDArray, pred: NDArray) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, NPV, PPV of accepted calls (NaN when undefined)."""
    tp = float(np.sum((y == 1) & pred))
    tn = float(np.sum((y == 0) & ~pred))
    fp = float(np.sum((y == 0) & pred))
    fn = float(np.sum((y == 1) & ~pred))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "accuracy": float(np.divide(tp + tn, tp + tn + fp + fn)),
            "sensitivity": float(np.divide(tp, tp + fn)),
            "specificity": float(np.divide(tn, tn + fp)),
            "npv": float(np.divide(tn, tn + fn)),
            "ppv": float(np.divide(tp, tp + fp)),
        }


def risk_at_coverage(labels: ArrayLike, probs: ArrayLike, threshold: float,
                     coverages: Sequence[float] = DEFAULT_COVERAGES,
                     confidence: ArrayLike | None = None) -> list[dict[str, Any]]:
    """A table for reports: for each target coverage, the most confident films making up at
    least that share (ties kept together), with the metrics of their calls."""
    y, p = _validate_inputs(labels, probs, "probs")
    t = _validate_threshold(threshold)
    conf = _confidence(p, t, confidence)
    curve = risk_coverage(y, p, t, conf)
    rows = []
    for target in coverages:
        if not 0.0 < float(target) <= 1.0:
            raise ValueError(f"coverages must be in (0, 1], got {target!r}")
        i = int(np.argmax(curve["coverage"] >= float(target) - 1e-12))
        keep = conf >= curve["cutoff"][i]
        rows.append({"target_coverage": float(target), "coverage": float(curve["coverage"][i]),
                     "n_accepted": int(keep.sum()), "cutoff": float(curve["cutoff"][i]),
                     **_accepted_metrics(y[keep], p[keep] >= t)})
    return rows


def choose_abstain_band(labels: ArrayLike, probs: ArrayLike, threshold: float, *,
                        target_accuracy: float | None = None,
                        target_npv: float | None = None) -> tuple[float, float]:
    """The abstain band ``(low, high)``, ``low <= threshold <= high``, to choose on validation:
    films with ``low <= p < high`` are "uncertain", ``p < low`` NORMAL, ``p >= high`` PNEUMONIA.

    Among all bands whose accepted calls meet the targets (``target_accuracy``: accuracy of all
    accepted calls; ``target_npv``: share of NORMAL calls that are truly normal, the number a
    missed pneumonia hurts), the one accepting the most films; ties go to the narrower band.
    A target counts as met when no call of that kind is made. Candidates are the observed
    probabilities, so the band reproduces exactly what was measured; ``(threshold, threshold)``
    means no abstention is needed. When no film at all can be accepted, warns and returns the
    band that refuses every film.
    """
    if target_accuracy is None and target_npv is None:
        raise ValueError("choose_abstain_band needs target_accuracy and/or target_npv")
    for name, value in (("target_accuracy", target_accuracy), ("target_npv", target_npv)):
        if value is not None and not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    y, p = _validate_inputs(labels, probs, "probs")
    t = _validate_threshold(threshold)
    n = y.shape[0]
    ps = np.sort(p, kind="mergesort")
    ys = y[np.argsort(p, kind="mergesort")].astype(np.int64)
    pos_before = np.r_[0, np.cumsum(ys)]  # positives among the i lowest probabilities
    neg_before = np.r_[0, np.cumsum(1 - ys)]

    lows = np.r_[np.unique(p[p < t]), t]  # accept p < low as NORMAL
    top = math.nextafter(max(float(p.max()), t), math.inf)
    highs = np.r_[t, np.unique(p[p > t]), top]  # accept p >= high as PNEUMONIA
    n_low = np.searchsorted(ps, lows, side="left")
    fn_low = pos_before[n_low]  # pneumonia called NORMAL
    start_high = np.searchsorted(ps, highs, side="left")
    n_high = n - start_high
    fp_high = neg_before[-1] - neg_before[start_high]  # normal called PNEUMONIA

    ok_low = np.ones(lows.shape[0], dtype=bool)
    if target_npv is not None:
        ok_low = fn_low <= (1.0 - float(target_npv)) * n_low + 1e-9
    best: tuple[int, float, int, int] | None = None  # (coverage, -width, i, j)
    rows = max(1, _BLOCK_CELLS // highs.shape[0])
    for r0 in range(0, lows.shape[0], rows):
        i = np.arange(r0, min(r0 + rows, lows.shape[0]))
        cover = n_low[i, None] + n_high[None, :]
        ok = np.broadcast_to(ok_low[i, None], cover.shape)
        if target_accuracy is not None:
            err = fn_low[i, None] + fp_high[None, :]
            ok = ok & (err <= (1.0 - float(target_accuracy)) * cover + 1e-9)
        score = np.where(ok, cover, -1).astype(np.float64)
        # Narrower bands win ties: subtract a width term smaller than one film.
        width = highs[None, :] - lows[i, None]
        score = score - 0.5 * width / (1.0 + width.max())
        flat = int(np.argmax(score))
        a, b = divmod(flat, highs.shape[0])
        cand = (int(cover[a, b]) if ok[a, b] else -1, -float(width[a, b]), int(i[a]), b)
        if best is None or cand[:2] > best[:2]:
            best = cand
    assert best is not None
    if best[0] <= 0:
        warnings.warn("no abstain band meets the target: every film would be 'uncertain'",
                      DegenerateInputWarning, stacklevel=2)
        return float(lows[0]), float(top)
    return float(lows[best[2]]), float(highs[best[3]])


def apply_band(probs: ArrayLike, low: float, high: float,
               class_names: Sequence[str] = CLASS_NAMES) -> NDArray:
    """Labels for ``probs``: ``class_names[0]`` below ``low``, ``class_names[1]`` at or above
    ``high``, :data:`UNCERTAIN` in between (read by a person)."""
    p = _as_probabilities(probs, "probs")
    low, high = _validate_threshold(low), _validate_threshold(high)
    if low > high:
        raise ValueError(f"band low must not exceed high, got ({low}, {high})")
    out = np.full(p.shape[0], UNCERTAIN, dtype=object)
    out[p < low] = class_names[0]
    out[p >= high] = class_names[1]
    return out


def band_metrics(labels: ArrayLike, probs: ArrayLike, low: float, high: float) -> dict[str, Any]:
    """Coverage and the metrics of the accepted calls under band ``(low, high)``; ``missed``
    is the share of all pneumonia films called NORMAL (never sent to a reader)."""
    y, p = _validate_inputs(labels, probs, "probs")
    low, high = _validate_threshold(low), _validate_threshold(high)
    keep = (p < low) | (p >= high)
    n_pos = int(y.sum())
    missed = int(np.sum((y == 1) & (p < low)))
    return {"low": low, "high": high, "coverage": float(keep.mean()), "n_accepted": int(keep.sum()),
            "n_uncertain": int((~keep).sum()), **_accepted_metrics(y[keep], p[keep] >= high),
            "missed": missed / n_pos if n_pos else math.nan}
