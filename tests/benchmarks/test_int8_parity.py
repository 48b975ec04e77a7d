"""benchmarks/int8_parity.py: its agreement summary (hand cases) and a --quick smoke run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import int8_parity  # noqa: E402


def test_agreement_hand_case() -> None:
    # labels 0 0 1 1; a ranks them perfectly, b swaps the middle two: AUC 1 vs 0.75.
    a, b, y = [0.1, 0.4, 0.6, 0.9], [0.1, 0.7, 0.45, 0.9], [0, 0, 1, 1]
    s = int8_parity.agreement(a, b, y, threshold=0.5)
    assert (s["n"], s["n_positive"]) == (4, 2)
    assert s["max_abs_prob_diff"] == pytest.approx(0.3) and s["mean_abs_prob_diff"] == pytest.approx(0.45 / 4)
    assert s["label_agreement"] == 0.5  # films 2 and 3 cross the threshold
    assert (s["auc_a"], s["auc_b"]) == (1.0, 0.75)
    same = int8_parity.agreement(a, a, y, threshold=0.5)
    assert same["max_abs_prob_diff"] == 0 and same["label_agreement"] == 1
    with pytest.warns(UserWarning):  # one class: no AUC
        assert math.isnan(int8_parity.agreement([0.2], [0.3], [1], 0.5)["auc_a"])
    with pytest.raises(ValueError, match="equal, non-empty"):
        int8_parity.agreement([0.1, 0.2], [0.1], [0, 1], 0.5)


def test_quick_run_writes_both_sections(tmp_path: Path) -> None:
    out = tmp_path / "parity"
    assert int8_parity.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["quick"] and result["hardware"]["cpu"]
    (model,) = result["sections"]["int8"].values()
    assert model["validation"]["n"] > 0 and "only=('val',)" in model["validation"]["rebuilt_with"]
    assert len(model["options"]) == 2
    for option in model["options"].values():
        assert option["n_images"] == model["validation"]["n"] and isinstance(option["written"], bool)
        # The rule's verdict is the one the numbers give.
        passed = abs(option["auc_difference"]) <= 0.003 and option["label_agreement"] >= 0.995
        assert option["written"] == passed
        assert option["flipped"] == round((1 - option["label_agreement"]) * option["n_images"])
    draft = result["sections"]["draft"]
    assert draft["summary"]["all"]["n"] == 4 * (1 + len(int8_parity.REENCODE))
    assert all(0 <= r["abs_diff"] <= 1 and r["p_draft"] is not None for r in draft["images"])
    assert "Draft decoding vs full decode" in out.with_suffix(".md").read_text()
