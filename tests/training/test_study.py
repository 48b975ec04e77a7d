"""A study (``compare``): a failing trial is reported while the others finish, a rerun skips
what is finished; and ``--executor ray`` on a local 2-CPU Ray instance, each model a Ray task,
gives the same leaderboard and probabilities as the sequential executor, with the model runs
nested in MLflow."""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pneumoscope.cli import main
from pneumoscope.config import RunConfig, load_config
from pneumoscope.pipeline import StudyFailedError, compare
from pneumoscope.runs import RunLayout


def tiny_study(data: Path, out: Path, weights: dict[str, str], *, tracking: bool = False) -> RunConfig:
    """Two tiny models (random init, 32 px, 1 epoch of 2 batches) on the synthetic tree."""
    return load_config(overrides={
        "data": {"root": str(data), "image_size": 32, "batch_size": 16},
        "model": {"weights": "none"},
        "train": {"epochs": 1, "limit_train_batches": 2, "accelerator": "cpu", "precision": "32-true"},
        "eval": {"n_bootstrap": 50, "stress_test": False, "fit_gate": False},
        "compare": {"models": ["resnet18", "efficientnet_lite0"], "weights": weights},
        "tracking": {"enabled": tracking}, "out": str(out), "name": "study"})


MISSING = "/no/such/weights.safetensors"


def test_failed_trial_is_reported_and_a_rerun_skips_finished(kermany_tree: Path, tmp_path: Path) -> None:
    config = tiny_study(kermany_tree, tmp_path, {"efficientnet_lite0": MISSING})
    result = compare(config, progress=False)
    assert [(o.model, o.status) for o in result["outcomes"]] == \
        [("resnet18", "finished"), ("efficientnet_lite0", "failed")]
    board = result["leaderboard"]
    assert [r["model"] for r in board["rows"]] == ["resnet18"]
    assert board["failed"][0]["model"] == "efficientnet_lite0" and MISSING in board["failed"][0]["error"]
    assert "**Failed** (1" in result["paths"]["md"].read_text()
    csv_rows = result["paths"]["csv"].read_text().splitlines()
    assert csv_rows[-1].startswith("efficientnet_lite0,") and ",failed," in csv_rows[-1]
    html = result["report"]["html"].read_text()  # the report is built from the finished runs
    assert "<strong>Failed</strong>" in html and "efficientnet_lite0 (FileNotFoundError" in html

    finished = tmp_path / "study" / "resnet18" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    again = compare(tiny_study(kermany_tree, tmp_path, {}), progress=False)
    assert [(o.model, o.status) for o in again["outcomes"]] == \
        [("resnet18", "skipped"), ("efficientnet_lite0", "finished")]
    assert finished.stat().st_mtime_ns == stamp
    assert {r["model"] for r in again["leaderboard"]["rows"]} == {"resnet18", "efficientnet_lite0"}
    assert again["leaderboard"]["failed"] == []

    # A finished folder is reused only for the same trial.
    changed = load_config(overrides={**config.to_dict(), "train": {**config.to_dict()["train"], "lr": 0.01}})
    with pytest.raises(FileExistsError, match=r"train\.lr: 0\.001 -> 0\.01"):
        compare(changed, progress=False)


def test_a_study_whose_every_trial_fails_raises(kermany_tree: Path, tmp_path: Path) -> None:
    config = tiny_study(kermany_tree, tmp_path, {"efficientnet_lite0": MISSING, "resnet18": MISSING})
    with pytest.raises(StudyFailedError, match=r"resnet18: .*no/such"):
        compare(config, progress=False)


# --- the Ray executor -------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One Ray instance for the module's Ray tests (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _comparable(board: dict) -> dict:
    """The leaderboard without what differs between any two runs of a study (folder, time)."""
    rows = [{k: v for k, v in r.items() if k not in ("run_dir", "wall_time_s")} for r in board["rows"]]
    return {**board, "rows": rows}


def _probs(run_dir: Path) -> list[str]:
    with open(RunLayout(run_dir).predictions("test"), newline="") as fh:
        return [row["prob_pneumonia"] for row in csv.DictReader(fh)]


def test_ray_study_fails_one_trial_reruns_and_equals_sequential(
        local_ray: None, kermany_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscope.ray_executor import RayExecutor

    # The report (Grad-CAM panels, seconds per model) is built from the run folders alone,
    # whichever executor wrote them: left out here to keep the test short.
    monkeypatch.setattr("pneumoscope.pipeline.write_report", lambda out: {})

    executor = RayExecutor(cpus_per_trial=1)
    # 1. Two trials in parallel; one cannot load its weights.
    first = compare(tiny_study(kermany_tree, tmp_path / "ray", {"efficientnet_lite0": MISSING},
                               tracking=True), executor=executor, progress=False)
    assert [(o.model, o.status) for o in first["outcomes"]] == \
        [("resnet18", "finished"), ("efficientnet_lite0", "failed")]
    assert [r["model"] for r in first["leaderboard"]["rows"]] == ["resnet18"]
    assert MISSING in first["leaderboard"]["failed"][0]["error"]
    _check_nested_runs(tmp_path / "ray", {"resnet18": "FINISHED", "efficientnet_lite0": "FAILED"})

    # 2. The same study again, through the CLI, with the weights fixed: only the failed trial runs.
    finished = RunLayout(tmp_path / "ray" / "study" / "resnet18").metrics
    stamp = finished.stat().st_mtime_ns
    assert main(["compare", "--data", str(kermany_tree), "--models", "resnet18,efficientnet_lite0",
                 "--weights", "none", "--image-size", "32", "--batch-size", "16", "--epochs", "1",
                 "--accelerator", "cpu", "--precision", "32-true", "--set", "train.limit_train_batches=2",
                 "--set", "eval.n_bootstrap=50", "--set", "eval.stress_test=false",
                 "--set", "eval.fit_gate=false", "--no-tracking", "--out", str(tmp_path / "ray"),
                 "--name", "study", "--executor", "ray", "--cpus-per-trial", "1"]) == 0
    assert finished.stat().st_mtime_ns == stamp

    # 3. The sequential executor on the same study: the same leaderboard, bit for bit, when it
    # trains with as many threads as each Ray trial has CPUs (CPU kernels sum in an order that
    # depends on the thread count, and training amplifies the last bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = compare(tiny_study(kermany_tree, tmp_path / "seq", {}), progress=False)
    finally:
        torch.set_num_threads(threads)
    again = compare(tiny_study(kermany_tree, tmp_path / "ray", {}), executor=executor, progress=False)
    assert [o.status for o in again["outcomes"]] == ["skipped", "skipped"]
    assert _comparable(again["leaderboard"]) == _comparable(seq["leaderboard"])
    for model in ("resnet18", "efficientnet_lite0"):
        assert _probs(tmp_path / "ray" / "study" / model) == _probs(tmp_path / "seq" / "study" / model)


def _check_nested_runs(out: Path, expected: dict[str, str]) -> None:
    """The study's MLflow store: one compare run, the models' runs nested under it."""
    if importlib.util.find_spec("mlflow") is None:
        return
    from mlflow.tracking import MlflowClient

    from pneumoscope.tracking import default_store_uri

    client = MlflowClient(tracking_uri=default_store_uri(out))
    runs = client.search_runs([client.get_experiment_by_name("pneumoscope").experiment_id])
    parents = [r for r in runs if r.data.tags["kind"] == "compare"]
    assert len(parents) == 1
    children = {r.data.tags["model"]: r.info.status for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == expected and len(runs) == 1 + len(expected)


def test_a_trial_larger_than_the_local_instance_stops_before_training(
        local_ray: None, kermany_tree: Path, tmp_path: Path) -> None:
    from pneumoscope.ray_executor import RayExecutor

    with pytest.raises(ValueError, match="3 CPU per trial, the cluster has 2"):
        compare(tiny_study(kermany_tree, tmp_path, {}), executor=RayExecutor(cpus_per_trial=3),
                progress=False)
    assert not RunLayout(tmp_path / "study" / "resnet18").config.exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cpus_per_trial": 0}, "--cpus-per-trial must be > 0"),
    ({"gpus_per_trial": 2}, r"--gpus-per-trial must be in \[0, 1\]"),
    ({"address": "auto", "num_cpus": 2}, "not with an address"),
])
def test_bad_ray_options_fail_before_any_work(kwargs: dict, message: str) -> None:
    pytest.importorskip("ray")
    from pneumoscope.ray_executor import RayExecutor

    with pytest.raises(ValueError, match=message):
        RayExecutor(**kwargs)


def test_ray_options_need_the_ray_executor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--data", ".", "--ray-address", "auto"]) == 2
    assert "--ray-address need --executor ray" in capsys.readouterr().err
