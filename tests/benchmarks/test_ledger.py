"""The test-split ledger (benchmarks/ledger.py): config hashes, rows, backfill and README."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import ledger  # noqa: E402

from pneumoscope.config import load_config  # noqa: E402


def _accuracy_record(dataset: str = "Kermany chest_xray (official test)") -> dict:
    seeds = [{"seed": s, "by_subtype": {"normal": {"n": 234}, "bacteria": {"n": 242}, "virus": {"n": 148}}}
             for s in (0, 1, 2)]
    return {"recipe": "kermany-x", "dataset": dataset, "seeds": seeds,
            "config_overrides": ["model.name=efficientnet_lite0", "train.lr=0.001"],
            "metrics": {"auc": 0.98, "accuracy": 0.9, "sensitivity": 0.99, "specificity": 0.75}}


def test_recipe_hash_ignores_what_names_a_run() -> None:
    base = ["model.name=resnet18", "train.lr=0.001"]
    a = load_config(dotted=[*base, "train.seed=0", "data.root=/a", "out=x", "name=n0"])
    b = load_config(dotted=[*base, "train.seed=7", "data.root=/b", "out=y", "name=n7",
                            "tracking.enabled=false"])
    assert ledger.recipe_sha256(a) == ledger.recipe_sha256(b) == ledger.recipe_sha256(a.to_dict())
    assert len(ledger.recipe_sha256(a)) == 64
    assert ledger.recipe_sha256(load_config(dotted=[*base, "train.epochs=3"])) != ledger.recipe_sha256(a)
    # Old keys resolve to the same recipe (data.augment_preset became data.augment).
    assert ledger.recipe_sha256({"data": {"augment_preset": "texture"}}) == \
        ledger.recipe_sha256(load_config(dotted=["data.augment=texture"]))


def test_record_file_appends_one_row_per_read(tmp_path: Path) -> None:
    result = tmp_path / "kermany-x.json"
    result.write_text(json.dumps(_accuracy_record()))
    rows = ledger.record_file(result)
    rows += ledger.record_file(result, kind="from-runs", note="rebuilt")
    saved = ledger.read_ledger(tmp_path / ledger.LEDGER_NAME)
    assert saved == rows and [r["kind"] for r in saved] == ["evaluated", "from-runs"]
    row = saved[0]
    assert row["recipe"] == "kermany-x" and row["seeds"] == "0;1;2" and row["n_test"] == "624"
    assert float(row["auc"]) == 0.98 and float(row["specificity"]) == 0.75
    overrides = _accuracy_record()["config_overrides"]
    assert row["config_sha256"] == ledger.recipe_sha256(load_config(dotted=overrides))
    assert row["git_commit"] and row["time_utc"].endswith("+00:00")
    assert saved[1]["note"].endswith("rebuilt")
    with pytest.raises(ValueError, match="kind must be one of"):
        ledger.record_file(result, kind="peeked")


def test_files_that_do_not_read_test_write_nothing(tmp_path: Path) -> None:
    mnist = tmp_path / "pneumoniamnist-x.json"
    mnist.write_text(json.dumps(_accuracy_record("PneumoniaMNIST (official test)")))
    synthetic_site = tmp_path / "site-quick.json"
    synthetic_site.write_text(json.dumps({"benchmark": "site-quick", "data": "synthetic phantoms",
                                          "model": {}, "result": {}}))
    assert ledger.record_file(mnist) == [] and ledger.record_file(synthetic_site) == []
    assert not (tmp_path / ledger.LEDGER_NAME).exists()


def test_gate_rows_have_no_classifier_metrics() -> None:
    reads = ledger.test_reads({"benchmark": "my-tag", "checkpoint": "runs/h/run7/model.safetensors",
                               "kermany": {"test": {"n": 624}}, "ood": {}})
    assert [(r.recipe, dict(r.metrics), r.n_test) for r in reads] == [("my-tag/run7", {}, 624)]


def test_a_foreign_csv_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        ledger.read_ledger(path)


@pytest.fixture(scope="module")
def committed() -> list[dict[str, str]]:
    return ledger.read_ledger(ledger.RESULTS / ledger.LEDGER_NAME)


def test_committed_backfill_is_what_the_command_gives(committed: list[dict[str, str]]) -> None:
    try:
        rows = ledger.backfill_rows()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with {ledger.BACKFILL_BASE[:8]} (a shallow clone or an export)")
    assert [r for r in committed if r["kind"] == "backfilled"] == rows
    recipes = {r["recipe"] for r in rows}
    assert {"kermany-efficientnet_lite0", "kermany-efficientnet_lite0-light", "kermany-linear-probe",
            "quick-compare-cpu/efficientnet_lite0", "seed-study-gpu/resnetv2_50"} <= recipes
    assert not any(r.startswith("pneumoniamnist") for r in recipes)


def test_backfilled_hash_is_the_current_recipe(committed: list[dict[str, str]]) -> None:
    """A rerun of accuracy.py's recipe lands on the same hash as its backfilled row."""
    import accuracy

    row = next(r for r in committed if r["recipe"] == "kermany-efficientnet_lite0")
    overrides = accuracy.RECIPES["kermany-efficientnet_lite0"]["overrides"]
    assert row["config_sha256"] == ledger.recipe_sha256(load_config(dotted=overrides))


def test_readme_section_is_generated_from_the_ledger(committed: list[dict[str, str]]) -> None:
    readme = (ledger.REPO / "README.md").read_text()
    section = readme.split(ledger.README_BEGIN, 1)[1].split(ledger.README_END, 1)[0]
    expected = ledger.readme_section(committed, "benchmarks/results/test-ledger.csv")
    assert section.strip() == expected.strip(), \
        "README's ledger section is stale: run python benchmarks/ledger.py --readme"
    with open(ledger.RESULTS / ledger.LEDGER_NAME, newline="") as fh:
        assert tuple(next(csv.reader(fh))) == ledger.FIELDS
