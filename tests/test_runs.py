"""Run-folder outputs: epochs.csv grows row by row, and metrics.json exists only for a complete run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.config import load_config
from pneumoscope.data.cache import SplitData
from pneumoscope.data.records import ImageRecord
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.evaluation import finalize
from pneumoscope.models.factory import build_model
from pneumoscope.runs import RunLayout, append_epoch_row, read_history


def test_epoch_rows_append_with_one_header(tmp_path: Path) -> None:
    path = tmp_path / "run" / "epochs.csv"
    append_epoch_row(path, {"epoch": 0, "train_loss": 0.7, "val_loss": None, "val_auc": 0.6})
    append_epoch_row(path, {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_auc": 0.8})
    assert path.read_text().splitlines() == ["epoch,train_loss,val_loss,val_auc", "0,0.7,,0.6",
                                             "1,0.5,0.4,0.8"]
    assert read_history(path.parent)["val_auc"] == [0.6, 0.8]
    assert [p.name for p in path.parent.iterdir()] == ["epochs.csv"]  # no temp file left


def _split(name: str, n: int, rng: np.random.Generator) -> SplitData:
    labels = [i % 2 for i in range(n)]
    images = np.stack([make_phantom(rng, 32, pneumonia=bool(y)) for y in labels])
    records = [ImageRecord(f"{name}/{i}.png", y, name, f"p{name}{i}") for i, y in enumerate(labels)]
    return SplitData(images, records)


@pytest.fixture
def tiny_run(tmp_path: Path):
    rng = np.random.default_rng(0)
    splits = {"val": _split("val", 8, rng), "test": _split("test", 8, rng)}
    config = load_config(dotted=[f"out={tmp_path}", "data.image_size=32", "model.name=resnet18",
                                 "model.weights=none", "eval.n_bootstrap=0", "eval.stress_test=false",
                                 "eval.fit_gate=false"])
    return build_model("resnet18", "none", image_size=32).eval(), splits, config


def test_metrics_json_is_written_after_the_model_file(tiny_run, monkeypatch: pytest.MonkeyPatch) -> None:
    model, splits, config = tiny_run
    layout = RunLayout(config.run_dir)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(finalize, "save_checkpoint", crash)
        with pytest.raises(OSError, match="disk full"):
            finalize.finalize_run(model, splits, config, fit_facts={}, started=time.perf_counter(),
                                  progress=False)
    assert not layout.metrics.exists()  # a run without its model file never looks complete
    finalize.finalize_run(model, splits, config, fit_facts={}, started=time.perf_counter(), progress=False)
    assert layout.model.is_file() and layout.metrics.is_file()
    assert layout.model.stat().st_mtime_ns <= layout.metrics.stat().st_mtime_ns
    assert not [p for p in layout.root.rglob("*") if p.name.endswith(".tmp")]
