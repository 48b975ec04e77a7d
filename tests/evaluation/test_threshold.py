"""Operating-threshold selection."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscope.evaluation.metrics import DegenerateInputWarning, binary_metrics
from pneumoscope.evaluation.threshold import THRESHOLD_METHODS, ThresholdRule, choose_threshold


def test_methods() -> None:
    assert THRESHOLD_METHODS == ("youden", "target_sensitivity")


@pytest.mark.parametrize(("rule", "label", "where"), [
    (ThresholdRule(), "youden", "on the validation split"),
    (ThresholdRule(pooled_with_stress=True), "youden@val+stress", "validation split pooled with its"),
    (ThresholdRule("target_sensitivity", 0.95, at_site=True), "target_sensitivity=0.95@site",
     "site's own labelled films"),
    (ThresholdRule(oof_folds=5), "youden@oof5", "out-of-fold predictions of a 5-fold cross-validation"),
    (ThresholdRule("target_sensitivity", 0.9, True, oof_folds=3), "target_sensitivity=0.9@oof3+stress",
     "3-fold cross-validation inside the training split pooled with their stress-tested copies"),
])
def test_rule_label_round_trips_and_describes(rule: ThresholdRule, label: str, where: str) -> None:
    assert rule.label == label
    assert ThresholdRule.from_label(label) == rule
    assert ThresholdRule(**rule.to_dict()) == rule
    assert where in rule.describe()


def test_separable_youden_gives_perfect_operating_point() -> None:
    y = [0, 0, 0, 1, 1]
    p = [0.1, 0.2, 0.3, 0.7, 0.9]
    t = choose_threshold(y, p)
    assert t == 0.7  # the lowest positive score: the highest threshold that catches all
    m = binary_metrics(y, p, threshold=t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


# y = [0, 1, 0, 1], p = [0.2, 0.4, 0.6, 0.8]. Thresholds from the top:
#   0.8: sens 1/2, spec 1   -> J 0.5        0.6: sens 1/2, spec 1/2 -> J 0
#   0.4: sens 1,   spec 1/2 -> J 0.5        0.2: sens 1,   spec 0   -> J 0
TIE_Y = [0, 1, 0, 1]
TIE_P = [0.2, 0.4, 0.6, 0.8]


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("youden", None, 0.8),  # J ties between 0.8 and 0.4: the more specific one wins
        ("target_sensitivity", 1.0, 0.4),
        ("target_sensitivity", 0.5, 0.8),
        ("target_sensitivity", 0.3, 0.8),
        ("target_sensitivity", 0.51, 0.4),
    ],
)
def test_hand_table(method: str, target: float | None, expected: float) -> None:
    assert choose_threshold(TIE_Y, TIE_P, method=method, target_sensitivity=target) == expected


def test_tied_scores_are_one_candidate() -> None:
    # 0.5 holds one positive and one negative; no threshold can split them.
    #   0.9: sens 2/3, spec 1 -> J 2/3    0.5: sens 1, spec 1/2 -> J 1/2    0.1: J 0
    y = [0, 0, 1, 1, 1]
    p = [0.1, 0.5, 0.5, 0.9, 0.9]
    assert choose_threshold(y, p) == 0.9
    # Full sensitivity has to take the tied negative along.
    assert choose_threshold(y, p, "target_sensitivity", 1.0) == 0.5
    assert binary_metrics(y, p, 0.5)["specificity"] == 0.5


@pytest.mark.parametrize("seed", range(6))
def test_youden_is_brute_force_maximum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1), 2)
    t = choose_threshold(y, p)
    assert t in set(p.tolist())
    best = max(
        (binary_metrics(y, p, c)["sensitivity"] + binary_metrics(y, p, c)["specificity"], c)
        for c in np.unique(p)
    )
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best[0], abs=1e-12)
    # Among equally good thresholds, the highest one.
    assert t == pytest.approx(best[1])


@pytest.mark.parametrize("seed", range(4))
def test_target_sensitivity_reached_and_highest(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    y = rng.integers(0, 2, 300)
    y[:2] = [0, 1]
    p = np.round(np.clip(0.4 * y + 0.6 * rng.random(300), 0, 1), 3)
    t = choose_threshold(y, p, method="target_sensitivity", target_sensitivity=0.95)
    assert binary_metrics(y, p, t)["sensitivity"] >= 0.95
    higher = np.unique(p[p > t])
    if higher.size:
        # The next candidate up misses the target, so no more specific threshold would do.
        assert binary_metrics(y, p, higher[0])["sensitivity"] < 0.95


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "otsu"}, "otsu"),
        ({"method": "target_sensitivity"}, "target_sensitivity"),
        ({"method": "target_sensitivity", "target_sensitivity": 0.0}, "0.0"),
        ({"method": "target_sensitivity", "target_sensitivity": 1.5}, "1.5"),
        ({"method": "target_sensitivity", "target_sensitivity": -0.2}, "-0.2"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        choose_threshold([0, 1], [0.2, 0.8], **kwargs)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        choose_threshold([0, 1, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="labels"):
        choose_threshold([0, 3], [0.2, 0.8])


def test_target_ignored_by_youden_warns() -> None:
    with pytest.warns(UserWarning, match="ignored"):
        assert choose_threshold(TIE_Y, TIE_P, "youden", target_sensitivity=0.9) == 0.8


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_one_class_warns_and_returns_half(method: str) -> None:
    target = 0.9 if method == "target_sensitivity" else None
    with pytest.warns(DegenerateInputWarning, match="one class"):
        t = choose_threshold([1, 1, 1], [0.2, 0.6, 0.9], method, target)
    assert t == 0.5
