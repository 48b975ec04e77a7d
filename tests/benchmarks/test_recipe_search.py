"""benchmarks/recipe_search.py round 3: the choice rule and the member runs it shares with
accuracy.py (no training here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import recipe_search as rs  # noqa: E402


def _result(criterion: float, train_s: float = 600.0) -> dict:
    return {"stress": {"criterion": criterion}, "eligible": train_s <= rs.BUDGET_S}


def test_the_simplest_eligible_candidate_within_the_margin_wins() -> None:
    results = {"single": _result(0.960), "tta": _result(0.962), "ens3": _result(0.969)}
    assert rs.choose_round3(results) == "ens3"  # 0.962 < 0.969 - 0.005
    results["ens3"] = _result(0.964)
    assert rs.choose_round3(results) == "single"  # within 0.005 of the best: simplest stays
    results["big"] = _result(0.999, train_s=rs.BUDGET_S + 1)
    assert rs.choose_round3(results) == "single"  # over the budget: not eligible
    with pytest.raises(SystemExit, match="budget"):
        rs.choose_round3({"big": _result(0.99, train_s=rs.BUDGET_S + 1)})


def test_ensemble_members_share_one_split_and_differ_in_seed(tmp_path: Path) -> None:
    configs = rs.round3_runs("texture-ens3", "data", tmp_path)
    assert [c.train.seed for c in configs] == [0, 1, 2]
    assert {c.split_seed for c in configs} == {rs.ROUND3_SPLIT_SEED}
    assert len({c.run_dir for c in configs}) == 3
    # The single-model candidate is the ensemble's first member: trained once.
    assert rs.round3_runs("texture", "data", tmp_path)[0].run_dir == configs[0].run_dir
    # accuracy.py's split seed 0 members are the search's runs.
    member = rs.round3_member_config("efficientnet_lite0", 0, 0, "data", tmp_path)
    assert member.run_dir == configs[0].run_dir
    assert all(c.eval.n_bootstrap == 200 and c.data.augment == "texture" for c in configs)


def test_write_result_adds_provenance_and_writes_both_files(tmp_path: Path) -> None:
    md = rs.write_result(tmp_path / "sub" / "search", {"chosen_recipe": "ens3"},
                         lambda r: f"# chosen {r['chosen_recipe']} on {r['hardware']['cpu']}\n")
    assert md == tmp_path / "sub" / "search.md" and md.read_text().startswith("# chosen ens3 on ")
    saved = json.loads((tmp_path / "sub" / "search.json").read_text())
    assert saved["chosen_recipe"] == "ens3"
    assert {"hardware", "versions", "command", "finished"} <= set(saved)


@pytest.mark.parametrize(("stem", "render"), [("recipe-search-kermany-r3", "markdown_round3"),
                                               ("recipe-search-kermany", "markdown")])
def test_saved_search_results_render_to_their_markdown(stem: str, render: str) -> None:
    results = BENCHMARKS / "results"
    saved = json.loads((results / f"{stem}.json").read_text())
    assert getattr(rs, render)(saved) == (results / f"{stem}.md").read_text()
