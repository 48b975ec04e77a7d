"""The out-of-fold threshold (``threshold-oof``): k trainings of a run's recipe on patient-grouped
folds of its training split, every training film scored once by a model that did not train on
it, the threshold chosen on those scores, a new model file; the test split never read, the
run's own file unchanged, a rerun resumes. Also a run trained with ``eval.tta`` (its threshold
chosen on TTA probabilities, recorded in the model file), which the folds then follow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from pneumoscope import oof
from pneumoscope.cli import main
from pneumoscope.config import load_config
from pneumoscope.data.records import read_records
from pneumoscope.data.splits import grouped_folds, patient_overlap
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.threshold import ThresholdRule, choose_threshold
from pneumoscope.evaluation.tta import TTA_VIEWS, view_names
from pneumoscope.models.checkpoint import load_checkpoint, read_info
from pneumoscope.pipeline import RunResult, train
from pneumoscope.runs import RunLayout, read_predictions

TINY = ("model.name=resnet18", "model.weights=none", "data.image_size=32", "data.batch_size=8",
        "train.epochs=1", "train.limit_train_batches=3", "eval.n_bootstrap=0", "eval.stress_test=false",
        "eval.fit_gate=false", "tracking.enabled=false", "eval.tta=true")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    from pneumoscope.data.synthetic import write_kermany_tree

    tree = write_kermany_tree(tmp_path_factory.mktemp("oof") / "xray",
                              {"train": (18, 24), "val": (6, 6), "test": (6, 6)}, size=40, seed=5)
    out = tmp_path_factory.mktemp("oof-runs")
    return train(load_config(dotted=[f"data.root={tree}", f"out={out}", *TINY]), progress=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_tta_run_chooses_and_records_its_threshold_with_tta(run: RunResult) -> None:
    model, info = load_checkpoint(run.checkpoint)
    assert info.tta == view_names(TTA_VIEWS)
    summary = json.loads((run.run_dir / "metrics.json").read_text())
    assert summary["tta"] == list(info.tta)
    from pneumoscope.data.cache import cached_images

    val = read_predictions(RunLayout(run.run_dir).predictions("val"))
    images = cached_images(val.records, 32).images
    with_tta = predict_proba(model, images, tta=TTA_VIEWS)
    np.testing.assert_allclose(val.probs, with_tta, atol=1e-6)
    assert not np.allclose(val.probs, predict_proba(model, images), atol=1e-6)
    assert info.threshold == choose_threshold(val.labels, with_tta)


def test_out_of_fold_threshold(run: RunResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    decoded: list[str] = []
    real = oof.cached_images
    monkeypatch.setattr(oof, "cached_images", lambda recs, *a, **k: decoded.extend(r.path for r in recs)
                        or real(recs, *a, **k))
    layout = RunLayout(run.run_dir)
    original = _sha(run.checkpoint)
    result = oof.threshold_oof(run.run_dir, folds=3, progress=False)

    # The films are exactly the run's training split, each held out once; nothing else is read.
    train_records = read_records(layout.split_file("train"))
    assert [r.path for r in result.records] == [r.path for r in train_records] == decoded
    assert sorted(np.bincount(result.fold_of).tolist()) == sorted(
        len(held) for _, held in grouped_folds(train_records, 3, 42))
    assert np.isfinite(result.probs).all()
    for i in range(3):
        fold = RunLayout(layout.oof_fold(3, i))
        fold_train, fold_val = (read_records(fold.split_file(s)) for s in ("train", "val"))
        held = [r.path for r, f in zip(result.records, result.fold_of, strict=True) if f == i]
        assert [r.path for r in fold_val] == held
        assert not set(held) & {r.path for r in fold_train}
        assert not patient_overlap(fold_train, fold_val)
        assert sorted(r.path for r in fold_train + fold_val) == sorted(r.path for r in train_records)
        assert not fold.split_file("test").exists() and not fold.predictions("test").exists()
        # The fold's own validation predictions (made with TTA, as the run's file says) are the OOF ones.
        np.testing.assert_allclose(read_predictions(fold.predictions("val")).probs,
                                   result.probs[result.fold_of == i], atol=1e-6)

    labels = np.array([r.label for r in result.records])
    assert result.threshold == choose_threshold(labels, result.probs)
    info = read_info(result.out)
    assert result.out == layout.oof_model(3)
    assert info.threshold == result.threshold and info.threshold_method == "youden@oof3"
    assert ThresholdRule.from_label(info.threshold_method) == result.rule == ThresholdRule(oof_folds=3)
    assert info.tta == view_names(TTA_VIEWS)  # the run's weights, the run's way of scoring
    step = info.provenance[-1]
    assert step["step"] == "threshold-oof" and step["folds"] == 3 and step["n_oof"] == len(labels)
    assert len(step["fold_auc"]) == 3 and step["wall_time_s"] > 0
    assert step["previous"]["threshold"] == read_info(run.checkpoint).threshold
    new, old = load_file(result.out), load_file(run.checkpoint)
    assert new.keys() == old.keys() and all((new[k] == old[k]).all() for k in old)
    assert _sha(run.checkpoint) == original
    assert result.trained == (0, 1, 2)

    # A rerun trains nothing finished; a fold left unfinished (metrics.json gone) is resumed.
    stamps = [(layout.oof_fold(3, i) / "epochs.csv").stat().st_mtime_ns for i in range(2)]
    (layout.oof_fold(3, 2) / "metrics.json").unlink()
    again = oof.threshold_oof(run.run_dir, folds=3, progress=False, out=tmp_path / "again.safetensors")
    assert again.trained == (2,)
    assert [(layout.oof_fold(3, i) / "epochs.csv").stat().st_mtime_ns for i in range(2)] == stamps
    assert again.threshold == result.threshold
    np.testing.assert_array_equal(again.probs, result.probs)

    capsys.readouterr()
    out = tmp_path / "cli.safetensors"
    assert main(["threshold-oof", str(run.run_dir), "--folds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 fold(s) trained now" in printed and str(out) in printed
    assert read_info(out).threshold == result.threshold
    with pytest.raises(FileExistsError, match="overwrite"):
        oof.threshold_oof(run.run_dir, folds=3, progress=False, out=out)
    with pytest.raises(ValueError, match="never modifies the original"):
        oof.threshold_oof(run.run_dir, folds=3, progress=False, out=run.checkpoint)
