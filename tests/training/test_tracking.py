"""MLflow tracking: a tiny run is read back through ``MlflowClient`` (params, epoch curves,
final metrics, artifacts, tags); tracking off writes no store; a bad explicit URI fails fast."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest

from pneumoscope import tracking
from pneumoscope.config import load_config
from pneumoscope.evaluation.threshold import ThresholdRule
from pneumoscope.pipeline import train
from pneumoscope.runs import OperatingPoint, RunSummary, SplitReport
from pneumoscope.tracking import TrackingError, default_store_uri, track_run

TINY = ("model.name=resnet18", "model.weights=none", "data.image_size=32", "data.batch_size=16",
        "train.limit_train_batches=2", "eval.n_bootstrap=0")


def _config(tree: Path, out: Path, *extra: str):
    return load_config(dotted=[f"data.root={tree}", f"out={out}", *TINY, *extra])


@pytest.fixture(scope="module")
def tracked_run(kermany_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("tracked")
    train(_config(kermany_tree, out, "train.epochs=1", "tracking.experiment=tiny"), progress=False)
    # The resumed run continues the same MLflow run.
    result = train(_config(kermany_tree, out, "train.epochs=2", "tracking.experiment=tiny"),
                   resume=True, progress=False)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_store_uri(out))
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return result, client, runs[0]


def test_params_tags_and_final_metrics(tracked_run) -> None:
    result, _, run = tracked_run
    assert run.info.status == "FINISHED" and run.info.run_name == result.run_dir.name
    params = run.data.params
    assert params["model.name"] == "resnet18" and params["data.image_size"] == "32"
    # Params are write-once: the first value stays, the resumed run's value is a tag.
    assert params["train.epochs"] == "1" and run.data.tags["resumed.train.epochs"] == "2"
    assert params["tracking.experiment"] == "tiny"
    tags = run.data.tags
    assert tags["model"] == "resnet18" and tags["weights"] == "none"
    assert tags["dataset"] == "chest_xray" and tags["pneumoscope_version"]
    assert tags["run_dir"] == str(result.run_dir.resolve())
    metrics = run.data.metrics
    test = result.summary.test.at_threshold.metrics
    assert metrics["test_auc"] == pytest.approx(test["auc"])
    assert metrics["threshold"] == pytest.approx(result.threshold)
    assert metrics["final_val_auc"] == pytest.approx(result.summary.val.at_threshold.metrics["auc"])
    assert {"test_sensitivity", "test_specificity", "epochs_run"} <= set(metrics)


def test_epoch_history_and_artifacts(tracked_run) -> None:
    result, client, run = tracked_run
    history = client.get_metric_history(run.info.run_id, "val_auc")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "metrics.json", "config.yaml", "epochs.csv",
            "predictions_test.csv", "splits"} <= names
    # Artifacts live next to the store, not in the working directory's ./mlruns.
    assert (result.run_dir.parent / "mlartifacts").is_dir()


def _report(metrics: dict, ci95: dict) -> SplitReport:
    point = OperatingPoint(0.4, metrics, ci95, {})
    return SplitReport(10, 5, 5, 0.4, "youden", list(metrics), point, point)


def test_final_metrics_carry_cis() -> None:
    summary = RunSummary("resnet18", "none", 0.4, ThresholdRule(), epochs_run=2,
                         val=_report({"auc": 0.7}, {}),
                         test=_report({"auc": 0.9, "f1": None}, {"auc": [0.8, 0.95]}))
    assert tracking.final_metrics(summary) == {
        "threshold": 0.4, "epochs_run": 2.0, "final_val_auc": 0.7, "test_auc": 0.9,
        "test_auc_ci_low": 0.8, "test_auc_ci_high": 0.95}


def test_disabled_tracking_writes_no_store(tmp_path: Path) -> None:
    config = load_config(dotted=[f"out={tmp_path}", "tracking.enabled=false"])
    with track_run(config, tmp_path / "run") as tracker:
        tracker.log_epoch(0, {"val_auc": 0.5})
        tracker.log_final(RunSummary("resnet18", "none", 0.5, ThresholdRule(), val=_report({}, {})))
    assert not tracker.active and not list(tmp_path.iterdir())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("uri", "message"), [
    ("http://127.0.0.1:{port}", "unreachable"),
    ("nosuchscheme://x", "cannot track to MLflow"),
])
def test_bad_explicit_uri_fails_before_training(uri: str, message: str, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    config = load_config(dotted=[f"out={tmp_path}", f"tracking.uri={uri.format(port=_free_port())}"])
    with pytest.raises(TrackingError, match=message), track_run(config, tmp_path / "run"):
        pass


def test_missing_mlflow_warns_once_by_default_and_fails_when_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    monkeypatch.setattr(tracking, "_warned_missing", False)
    config = load_config(dotted=[f"out={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        for _ in range(2):
            with track_run(config, tmp_path / "run") as tracker:
                assert not tracker.active
    warned = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert len(warned) == 1 and "pneumoscope[tracking]" in warned[0]
    explicit = load_config(dotted=[f"out={tmp_path}", "tracking.uri=http://127.0.0.1:5000"])
    with pytest.raises(ModuleNotFoundError, match="needs MLflow"), track_run(explicit, tmp_path / "r"):
        pass


def test_cli_options_set_the_tracking_config() -> None:
    from pneumoscope.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["train", "--tracking-uri", "http://h:5000", "--no-tracking"])
    config = _config_from_args(args)
    assert config.tracking.uri == "http://h:5000" and not config.tracking.enabled
    assert load_config().tracking.enabled and load_config().tracking.experiment == "pneumoscope"
