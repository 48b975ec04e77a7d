"""The command line end to end: train a short epoch → evaluate → compare, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pneumoscope.cli import build_parser, main

QUICK = ["--image-size", "48", "--batch-size", "16", "--set", "train.limit_train_batches=2",
         "--set", "eval.n_bootstrap=100"]


def test_train_evaluate_compare(kermany_tree: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert main(["train", "--data", str(kermany_tree), "--model", "resnet18", "--weights", "none",
                 "--epochs", "1", "--out", str(out), *QUICK]) == 0
    ckpt = out / "resnet18-seed42" / "model.safetensors"
    assert ckpt.is_file() and "run folder" in capsys.readouterr().out

    # Evaluate the model file on another NORMAL/PNEUMONIA tree (an "external site").
    site = kermany_tree / "test"
    assert main(["evaluate", str(ckpt), "--data", str(site), "--out", str(tmp_path / "ev"),
                 "--n-bootstrap", "50", "--stress"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["split"] == "all" and report["n"] > 0
    assert "stress jpeg_q20" in capsys.readouterr().out and "jpeg_q20" in report["stress"]
    assert report["threshold"] == json.loads((ckpt.parent / "metrics.json").read_text())["threshold"]
    assert (tmp_path / "ev" / "predictions.csv").is_file()

    assert main(["compare", "--data", str(kermany_tree), "--models", "resnet18,efficientnet_b0",
                 "--weights", "none", "--epochs", "1", "--out", str(out), "--name", "cmp",
                 *QUICK]) == 0
    board = json.loads((out / "cmp" / "leaderboard.json").read_text())
    assert {r["model"] for r in board["rows"]} == {"resnet18", "efficientnet_b0"}
    others = [r for r in board["rows"] if r["model"] != board["reference"]]
    assert others[0]["vs_reference"]["p_delong"] is not None
    md = (out / "cmp" / "leaderboard.md").read_text()
    assert "resnet18" in md and "[" in md  # CIs are shown
    assert (out / "cmp" / "leaderboard.csv").read_text().count("\n") == 3
    _check_compare_tracked(out)
    # Re-running with --resume skips the finished models and rebuilds the leaderboard.
    assert main(["compare", "--data", str(kermany_tree), "--models", "resnet18,efficientnet_b0",
                 "--weights", "none", "--epochs", "1", "--out", str(out), "--name", "cmp",
                 "--resume", *QUICK]) == 0


def _check_compare_tracked(out: Path) -> None:
    """The default MLflow store in --out holds the train run and a compare run with the
    leaderboard, its model runs nested under it."""
    if importlib.util.find_spec("mlflow") is None:
        return
    from mlflow.tracking import MlflowClient

    from pneumoscope.tracking import default_store_uri

    client = MlflowClient(tracking_uri=default_store_uri(out))
    runs = client.search_runs([client.get_experiment_by_name("pneumoscope").experiment_id])
    parent = next(r for r in runs if r.data.tags["kind"] == "compare")
    children = {r.data.tags["model"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {"resnet18", "efficientnet_b0"} and len(runs) == 4
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.json"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "resnet19", "--data", "."], "unknown model 'resnet19'"),
    (["train", "--model", "resnet18", "--data", "/no/such/folder", "--weights", "none"],
     "data folder not found: /no/such/folder"),
    (["train", "--epochs", "0", "--data", "."], "train.epochs must be >= 1"),
    (["compare", "--models", "resnet18,nope", "--data", "."], "unknown model 'nope'"),
    (["evaluate", "/no/model.safetensors", "--data", "."], "checkpoint not found"),
    (["train", "--set", "train.bogus=1"], "unknown config key"),
    (["train", "--augment", "wild", "--data", "."], "data.augment must be one of"),
])
def test_bad_input_exits_2_with_a_message(argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_bug_is_one_line_or_its_traceback_with_verbose(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import pneumoscope.cli as cli

    def broken(_: object) -> int:
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(cli, "cmd_models", broken)
    assert main(["models"]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: ZeroDivisionError: division by zero second line" in err
    assert "--verbose" in err
    with pytest.raises(ZeroDivisionError):
        main(["--verbose", "models"])


def test_verbose_logs_the_traceback_of_a_user_error(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--verbose", "evaluate", "/no/model.safetensors", "--data", "."]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("checkpoint not found: /no/model.safetensors")


@pytest.mark.parametrize(("flag", "augment"), [("texture", "texture"), ("none", "none"), (None, "light")])
def test_augment_flag_sets_the_preset(flag: str | None, augment: str) -> None:
    from pneumoscope.cli import _config_from_args, build_parser

    argv = ["train", "--data", "."] + (["--augment", flag] if flag else [])
    config = _config_from_args(build_parser().parse_args(argv))
    assert config.data.augment == augment


def test_weights_flag_sets_a_default_and_per_model_sources() -> None:
    from pneumoscope.cli import _config_from_args, build_parser

    argv = ["compare", "--data", ".", "--models", "efficientnet_lite0,resnet18",
            "--weights", "none,efficientnet_lite0=package"]
    config = _config_from_args(build_parser().parse_args(argv))
    assert config.compare.models == ("efficientnet_lite0", "resnet18")
    assert config.compare.sources(config.model.weights) == {"efficientnet_lite0": "package",
                                                            "resnet18": "none"}


def test_empty_class_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "train" / "PNEUMONIA").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path), "--weights", "none"]) == 2
    assert "NORMAL" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "compare"])
def test_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "example" in capsys.readouterr().out


def test_models_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "densenet121" in out and "--weights package" in out
    lite2 = next(line for line in out.splitlines() if line.startswith("efficientnet_lite2 "))
    assert "260 px" in lite2 and ("installed" in lite2 or "pneumoscope[lite2]" in lite2)


def test_data_check_and_offline_download(kermany_tree: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(kermany_tree)]) == 0
    out = capsys.readouterr().out
    assert "PNEUMONIA" in out and "train" in out
    # Nothing listens on port 9 here: the download fails fast and says how to go on offline.
    assert main(["data", "download", "--dest", str(tmp_path), "--url",
                 "http://127.0.0.1:9/ChestXRay2017.zip"]) == 2
    assert "--data" in capsys.readouterr().err


def test_predict_survives_kill_9_and_resumes(tmp_path: Path) -> None:
    """A real ``kill -9`` of ``python -m pneumoscope predict`` in the middle of a run: the rows
    written so far are whole, and ``--resume`` ends with one row per file, no duplicates."""
    import csv
    import io
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    import torch
    from PIL import Image

    from pneumoscope.data.synthetic import make_phantom
    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=32).eval()
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing))
    films = tmp_path / "films"
    films.mkdir()
    buf = io.BytesIO()
    Image.fromarray(make_phantom(np.random.default_rng(0), 64)).save(buf, format="PNG")
    n = 400
    for i in range(n):
        (films / f"{i:04d}.png").write_bytes(buf.getvalue())
    out = tmp_path / "rows.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pneumoscope", "predict", str(ckpt), str(films), "--out", str(out),
           "--batch-size", "1", "--decode-workers", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and out.read_bytes().count(b"\n") > 5:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "predict ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    complete_rows = out.read_bytes().count(b"\n") - 1  # a torn last line is cut by --resume
    assert 5 <= complete_rows < n
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{n - complete_rows} file(s), 0 failed" in resumed.stdout
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    paths = [r["path"] for r in rows]
    assert len(paths) == n and len(set(paths)) == n
    assert all(r["prob_pneumonia"] and not r["error"] for r in rows)


def test_data_check_exits_1_when_it_finds_problems(kermany_tree: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(kermany_tree / "test", root / "test")
    (root / "test" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff not really")
    assert main(["data", "check", str(root)]) == 1
    assert "PROBLEMS FOUND" in capsys.readouterr().out
