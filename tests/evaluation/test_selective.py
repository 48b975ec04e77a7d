from __future__ import annotations

import math

import numpy as np
import pytest

from pneumoscope.evaluation.metrics import DegenerateInputWarning
from pneumoscope.evaluation.selective import (
    UNCERTAIN,
    apply_band,
    band_metrics,
    choose_abstain_band,
    margin_confidence,
    risk_at_coverage,
    risk_coverage,
    selection_score,
)

# Calls at 0.5: 1, 0, 0, 1; the last two are wrong and tie on the logit margin (0.405).
Y4 = np.array([1, 0, 1, 0])
P4 = np.array([0.9, 0.2, 0.4, 0.6])


def test_risk_coverage_hand_case_with_tied_margins() -> None:
    rc = risk_coverage(Y4, P4, 0.5)
    np.testing.assert_allclose(rc["coverage"], [0.25, 0.5, 1.0])
    np.testing.assert_allclose(rc["risk"], [0.0, 0.0, 0.5])
    np.testing.assert_allclose(rc["cutoff"], [math.log(9), math.log(4), math.log(1.5)])
    assert rc["aurc"] == pytest.approx((0 + 0 + 2 * 0.5) / 4)
    # Oracle: both correct calls first, then risk 1/3 and 2/4.
    assert rc["aurc_optimal"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert rc["risk_full"] == 0.5
    # Input order does not matter.
    perm = [2, 0, 3, 1]
    assert risk_coverage(Y4[perm], P4[perm], 0.5)["aurc"] == pytest.approx(rc["aurc"])


def test_risk_coverage_with_a_caller_confidence() -> None:
    rc = risk_coverage(Y4, P4, 0.5, confidence=[1, 2, 3, 4])  # the two errors ranked first
    np.testing.assert_allclose(rc["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(rc["risk"], [1.0, 1.0, 2 / 3, 0.5])
    assert rc["aurc"] == pytest.approx((1 + 1 + 2 / 3 + 0.5) / 4)
    with pytest.raises(ValueError, match="same length"):
        risk_coverage(Y4, P4, 0.5, confidence=[1, 2])


def test_margin_is_on_the_logit_scale() -> None:
    # At threshold 0.1 a probability of 0.05 is closer (0.75 in logit) than 0.5 (2.20).
    np.testing.assert_allclose(margin_confidence([0.05, 0.5], 0.1),
                               [abs(math.log(0.05 / 0.95) - math.log(1 / 9)), math.log(9)])
    with pytest.raises(ValueError, match="threshold"):
        margin_confidence([0.5], 1.0)


def test_selection_score_takes_the_weaker_rank() -> None:
    # Margins 2.2, 2.2, 0.4 -> rank shares 2.5/3, 2.5/3, 1/3; -ood 0, -5, 0 -> 2.5/3, 1/3, 2.5/3.
    got = selection_score([0.9, 0.1, 0.6], 0.5, ood_score=[0.0, 5.0, 0.0])
    np.testing.assert_allclose(got, [2.5 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(selection_score([0.9, 0.6], 0.5), margin_confidence([0.9, 0.6], 0.5))


def test_risk_at_coverage_table() -> None:
    rows = risk_at_coverage(Y4, P4, 0.5, coverages=(1.0, 0.5, 0.3))
    assert [r["n_accepted"] for r in rows] == [4, 2, 2]
    assert [r["accuracy"] for r in rows] == [0.5, 1.0, 1.0]
    assert rows[2]["coverage"] == 0.5  # ties kept together: the next run ends at 0.5
    assert rows[1]["sensitivity"] == 1.0 and rows[1]["specificity"] == 1.0


# Sorted probabilities; calls at 0.5 are wrong for 0.3 (pneumonia) and 0.7 (normal).
YB = np.array([0, 0, 1, 0, 1, 0, 1, 1])
PB = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize(("kwargs", "band"), [
    ({"target_accuracy": 1.0}, (0.3, 0.8)),   # the widest error-free coverage: 4 films
    ({"target_accuracy": 0.8}, (0.3, 0.5)),   # 6 films, 1 error; (0.5, 0.8) ties but is wider
    ({"target_accuracy": 0.75}, (0.5, 0.5)),  # all 8 already meet it: no abstention
    ({"target_npv": 1.0}, (0.3, 0.5)),        # NORMAL calls must all be right
    ({"target_npv": 0.75}, (0.5, 0.5)),       # 3 of 4 NORMAL calls right is enough
    ({"target_npv": 1.0, "target_accuracy": 1.0}, (0.3, 0.8)),
])
def test_choose_abstain_band_hand_cases(kwargs: dict, band: tuple[float, float]) -> None:
    got = choose_abstain_band(YB, PB, 0.5, **kwargs)
    assert got == pytest.approx(band)
    # Shuffled input gives the same band.
    perm = np.random.default_rng(0).permutation(len(YB))
    assert choose_abstain_band(YB[perm], PB[perm], 0.5, **kwargs) == pytest.approx(band)


def test_apply_band_and_band_metrics() -> None:
    labels = apply_band(PB, 0.3, 0.8)
    assert labels.tolist() == ["NORMAL", "NORMAL", UNCERTAIN, UNCERTAIN, UNCERTAIN, UNCERTAIN,
                               "PNEUMONIA", "PNEUMONIA"]
    m = band_metrics(YB, PB, 0.3, 0.8)
    assert m["coverage"] == 0.5 and m["n_uncertain"] == 4 and m["accuracy"] == 1.0
    assert m["missed"] == 0.0
    m = band_metrics(YB, PB, 0.5, 0.5)
    assert m["coverage"] == 1.0 and m["accuracy"] == 0.75 and m["npv"] == 0.75
    assert m["missed"] == 0.25
    with pytest.raises(ValueError, match="must not exceed"):
        apply_band(PB, 0.6, 0.4)


def test_band_that_cannot_be_met_refuses_everything() -> None:
    with pytest.warns(DegenerateInputWarning, match="uncertain"):
        low, high = choose_abstain_band([1, 0], [0.4, 0.6], 0.5, target_accuracy=1.0)
    assert apply_band([0.4, 0.6], low, high).tolist() == [UNCERTAIN, UNCERTAIN]
    with pytest.raises(ValueError, match="target_accuracy and/or target_npv"):
        choose_abstain_band([1, 0], [0.4, 0.6], 0.5)
    with pytest.raises(ValueError, match="target_npv"):
        choose_abstain_band([1, 0], [0.4, 0.6], 0.5, target_npv=1.5)
