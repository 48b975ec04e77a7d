"""Metric math: hand-computed tables, agreement with scikit-learn, validation, degenerate input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumoscope.evaluation.metrics import (
    LOG_LOSS_EPS,
    METRIC_NAMES,
    DegenerateInputWarning,
    binary_metrics,
    confusion_counts,
    expected_calibration_error,
    reliability_curve,
)

# y = [0, 0, 1, 1], p = [0.1, 0.4, 0.35, 0.8], threshold 0.5: predictions [0, 0, 0, 1],
# so tn = 2, fp = 0, fn = 1, tp = 1. Pairs (pos, neg): 0.35 beats 0.1 only -> AUC 3/4.
# AP: from the top, 0.8 (pos) precision 1 at recall 1/2, 0.35 (pos) precision 2/3 at recall 1.
SMALL_Y = [0, 0, 1, 1]
SMALL_P = [0.1, 0.4, 0.35, 0.8]
SMALL_EXPECTED = {
    "auc": 0.75,
    "pr_auc": 0.5 * 1.0 + 0.5 * 2.0 / 3.0,
    "accuracy": 0.75,
    "balanced_accuracy": 0.75,
    "precision": 1.0,
    "sensitivity": 0.5,
    "specificity": 1.0,
    "npv": 2.0 / 3.0,
    "f1": 2.0 / 3.0,
    "log_loss": -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4.0,
    "brier": (0.01 + 0.16 + 0.4225 + 0.04) / 4.0,
}

# 2x2 table tp = 6, fn = 2, fp = 1, tn = 9 (18 cases), scores 0.9 = called positive, 0.1 = not.
TABLE_Y = [1] * 8 + [0] * 10
TABLE_P = [0.9] * 6 + [0.1] * 2 + [0.9] * 1 + [0.1] * 9
TABLE_EXPECTED = {
    "accuracy": 15 / 18,
    "balanced_accuracy": (6 / 8 + 9 / 10) / 2,
    "precision": 6 / 7,
    "sensitivity": 6 / 8,
    "specificity": 9 / 10,
    "npv": 9 / 11,
    "f1": 12 / 15,
}


def test_metric_names_order() -> None:
    assert METRIC_NAMES[:2] == ("auc", "pr_auc")
    assert METRIC_NAMES[-1] == "ece"
    assert len(set(METRIC_NAMES)) == 12


@pytest.mark.parametrize("name", sorted(SMALL_EXPECTED))
def test_small_hand_computed(name: str) -> None:
    assert binary_metrics(SMALL_Y, SMALL_P)[name] == pytest.approx(SMALL_EXPECTED[name], abs=1e-12)


def test_returns_exactly_metric_names() -> None:
    result = binary_metrics(SMALL_Y, SMALL_P)
    assert tuple(result) == METRIC_NAMES
    assert all(isinstance(v, float) for v in result.values())


@pytest.mark.parametrize("name", sorted(TABLE_EXPECTED))
def test_confusion_table_hand_computed(name: str) -> None:
    assert binary_metrics(TABLE_Y, TABLE_P)[name] == pytest.approx(TABLE_EXPECTED[name], abs=1e-12)


def test_confusion_counts_table() -> None:
    pred = (np.array(TABLE_P) >= 0.5).astype(int)
    assert confusion_counts(TABLE_Y, pred) == {"tn": 9, "fp": 1, "fn": 2, "tp": 6}


def test_threshold_is_inclusive() -> None:
    # A score equal to the threshold is a positive call.
    m = binary_metrics([0, 1], [0.5, 0.5], threshold=0.5)
    assert m["sensitivity"] == 1.0
    assert m["specificity"] == 0.0


@pytest.mark.parametrize(
    ("y", "p", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1], [0.3, 0.3], 0.5),  # a tie counts one half
        ([0, 0, 1, 1], [0.2, 0.2, 0.2, 0.9], 0.75),
        ([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.0),
        ([0, 1, 0, 1], [0.0, 1.0, 0.0, 1.0], 1.0),
    ],
)
def test_auc_table(y: list[int], p: list[float], expected: float) -> None:
    assert binary_metrics(y, p)["auc"] == pytest.approx(expected, abs=1e-12)


def _sklearn_reference(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (p >= threshold).astype(int)
    tn, fp, fn, _ = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    nan = np.nan
    clipped = np.clip(p, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    return {
        "auc": roc_auc_score(y, p),
        "pr_auc": average_precision_score(y, p),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=nan),
        "sensitivity": recall_score(y, pred, zero_division=nan),
        "specificity": tn / (tn + fp),
        "npv": tn / (tn + fn) if tn + fn else nan,
        "f1": f1_score(y, pred, zero_division=nan),
        "log_loss": log_loss(y, clipped),
        "brier": brier_score_loss(y, p),
    }


def _naive_ece(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        mask = (p > lo) & (p <= hi) if b else (p >= lo) & (p <= hi)
        if mask.any():
            total += mask.mean() * abs(p[mask].mean() - y[mask].mean())
    return total


@pytest.mark.parametrize("seed", range(12))
def test_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes present
    # Rounded scores give many ties; the signal makes AUC informative.
    p = np.clip(np.round(0.35 * y + 0.65 * rng.random(n), int(rng.integers(1, 3))), 0, 1)
    threshold = float(rng.choice([0.2, 0.5, 0.65]))
    ours = binary_metrics(y, p, threshold=threshold)
    ref = _sklearn_reference(y, p, threshold)
    for name, value in ref.items():
        if np.isnan(value):
            assert np.isnan(ours[name]), name
        else:
            assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert ours["ece"] == pytest.approx(_naive_ece(y, p, 15), abs=1e-9)
    counts = confusion_counts(y, (p >= threshold).astype(int))
    tn, fp, fn, tp = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).ravel()
    assert counts == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def test_log_loss_clips_hard_probabilities() -> None:
    m = binary_metrics([1, 0], [0.0, 1.0])
    assert m["log_loss"] == pytest.approx(-math.log(LOG_LOSS_EPS), rel=1e-6)
    assert np.isfinite(m["log_loss"])


def test_zero_denominator_ratio_is_nan_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Nothing called positive: precision is 0/0.
        m = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.9)
    assert np.isnan(m["precision"])
    assert m["f1"] == 0.0  # 2tp / (2tp + fp + fn) = 0 / 2 is defined
    assert m["sensitivity"] == 0.0
    assert m["specificity"] == 1.0


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_warns_and_returns_nan(label: int) -> None:
    y = [label] * 5
    p = [0.1, 0.3, 0.5, 0.7, 0.9]
    with pytest.warns(DegenerateInputWarning, match="auc"):
        m = binary_metrics(y, p)
    assert np.isnan(m["auc"])
    assert np.isnan(m["pr_auc"])
    missing_rate = "specificity" if label == 1 else "sensitivity"
    assert np.isnan(m[missing_rate])
    assert np.isfinite(m["accuracy"])
    assert np.isfinite(m["brier"])


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 1, 1], [0.2, 0.8], "same length"),
        ([[0, 1]], [[0.2, 0.8]], "1-D"),
        ([0, 2], [0.2, 0.8], "labels 0 and 1"),
        ([0, -1], [0.2, 0.8], "labels 0 and 1"),
        ([0, 1], [0.2, 1.5], r"\[0, 1\]"),
        ([0, 1], [-0.1, 0.5], r"\[0, 1\]"),
        ([0, 1], [0.2, float("nan")], "NaN"),
        ([0, 1], [0.2, float("inf")], "NaN or infinite"),
        ([], [], "empty"),
        (["a", "b"], [0.2, 0.8], "numeric"),
    ],
)
def test_input_validation(y: list, p: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, p)


def test_accepts_bool_labels_and_float_labels() -> None:
    a = binary_metrics(np.array([False, False, True, True]), SMALL_P)
    b = binary_metrics(np.array([0.0, 0.0, 1.0, 1.0]), SMALL_P)
    assert a["auc"] == b["auc"] == 0.75


def test_confusion_counts_validation() -> None:
    with pytest.raises(ValueError, match="y_pred"):
        confusion_counts([0, 1], [0, 0.7])
    with pytest.raises(ValueError, match="same length"):
        confusion_counts([0, 1], [0])


def test_ece_perfectly_calibrated_is_zero() -> None:
    # Score 0.3 on ten cases, 3 positive; 0.8 on ten, 8 positive: every bin matches exactly.
    y = [1] * 3 + [0] * 7 + [1] * 8 + [0] * 2
    p = [0.3] * 10 + [0.8] * 10
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    assert binary_metrics(y, p)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_badly_calibrated_hand_value() -> None:
    # 0.9 on four cases (2 positive): gap 0.4, weight 4/10; 0.2 on six (3 positive): gap 0.3,
    # weight 6/10. ECE = 0.16 + 0.18.
    y = [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    p = [0.9] * 4 + [0.2] * 6
    assert expected_calibration_error(y, p) == pytest.approx(0.34, abs=1e-12)
    assert binary_metrics(y, p)["ece"] == pytest.approx(0.34, abs=1e-12)
    # With one bin the two groups pool: mean p 0.48, 5/10 positive.
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.02, abs=1e-12)


def test_reliability_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    p = np.round(rng.random(500), 2)  # includes values on bin edges such as 0.1 and 0.2
    y = (rng.random(500) < p).astype(int)
    mean_pred, frac_pos, counts = reliability_curve(y, p, n_bins=10)
    assert mean_pred.shape == frac_pos.shape == counts.shape == (10,)
    assert counts.sum() == 500
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = counts > 0
    np.testing.assert_allclose(mean_pred[filled], prob_pred, atol=1e-12)
    np.testing.assert_allclose(frac_pos[filled], prob_true, atol=1e-12)


def test_reliability_curve_empty_bins_are_nan() -> None:
    mean_pred, frac_pos, counts = reliability_curve([0, 1], [0.05, 0.95], n_bins=4)
    assert counts.tolist() == [1, 0, 0, 1]
    assert np.isnan(mean_pred[1]) and np.isnan(frac_pos[2])
    assert mean_pred[0] == 0.05 and frac_pos[3] == 1.0


def test_bad_n_bins() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0, 1], [0.2, 0.8], n_bins=0)
