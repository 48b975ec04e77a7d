"""One training run, start to finish: data → model → Lightning fit → threshold → evaluation.

Each run is a folder::

    RUN/config.yaml            resolved config
    RUN/splits/{train,val,test}.csv
    RUN/epochs.csv             per-epoch metrics (appended across --resume)
    RUN/checkpoints/{best,last}.ckpt   Lightning checkpoints (resume with --resume)
    RUN/model.safetensors      self-describing model (weights + preprocessing + threshold)
    RUN/metrics.json           validation and test reports with 95% CIs
    RUN/predictions_{val,test}.csv
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

from pneumoscope import __version__
from pneumoscope.config import RunConfig, save_config
from pneumoscope.data.augment import BatchAugment, augment_config
from pneumoscope.data.datasets import SplitData, XrayDataModule, class_weights, load_splits
from pneumoscope.data.records import write_records
from pneumoscope.evaluation.evaluate import evaluate_predictions, write_json, write_predictions
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.stress import stress_probabilities, stress_report
from pneumoscope.evaluation.threshold import choose_threshold
from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
from pneumoscope.models.factory import build_model
from pneumoscope.models.registry import get_spec
from pneumoscope.training.module import ClassifierModule
from pneumoscope.training.tracking import RUN_FILES, Tracker, track_run

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class RunResult:
    """Where a finished run put its outputs, and its headline numbers."""

    run_dir: Path
    checkpoint: Path
    threshold: float
    metrics: dict[str, Any]
    wall_time_s: float


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), per ``/proc/cpuinfo``.
    The bf16 speed-ups were measured on such a CPU only, so False where they are absent or
    cannot be read (e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, accelerator: str, model: str | None = None) -> str:
    """``auto``: mixed precision on CUDA (bf16 where supported); on CPU, bf16 autocast for
    registry models marked ``cpu_bf16`` when the CPU has native bf16, else full fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("auto", "cpu") and model is not None and get_spec(model).cpu_bf16 \
            and cpu_supports_bf16():
        return "bf16-mixed"
    return "32-true"


def _data_summary(splits: dict[str, SplitData]) -> dict[str, Any]:
    return {name: {"images": len(s.records), "pneumonia": int(s.labels.sum()),
                   "patients": len({r.patient_id for r in s.records}),
                   "unreadable_skipped": len(s.failures)}
            for name, s in splits.items()}


def train(config: RunConfig, *, resume: bool = False, splits: dict[str, SplitData] | None = None,
          progress: bool = True, tracking_parent: Tracker | None = None,
          callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Train, pick the best epoch and the threshold on validation, evaluate on test once.

    ``resume`` continues from ``RUN/checkpoints/last.ckpt``. ``splits`` lets a caller
    (e.g. ``compare``) decode the data once and share it between models. The run is tracked
    in MLflow unless ``config.tracking.enabled`` is off; ``tracking_parent`` nests it under
    ``compare``'s run. ``callbacks`` are extra Lightning callbacks (e.g. a benchmark's timers).
    """
    start = time.perf_counter()
    run_dir = config.run_dir
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last}")
    if not resume and last.is_file():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it "
                              "or choose another --out/--name")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    with track_run(config, run_dir, parent=tracking_parent, resume=resume) as tracker:
        return _fit_and_evaluate(config, tracker, resume=resume, splits=splits, progress=progress,
                                 start=start, extra_callbacks=callbacks)


def _fit_and_evaluate(config: RunConfig, tracker: Tracker, *, resume: bool,
                      splits: dict[str, SplitData] | None, progress: bool, start: float,
                      extra_callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """The body of :func:`train` once the run folder exists."""
    run_dir = config.run_dir
    last = run_dir / "checkpoints" / "last.ckpt"
    if splits is None:
        splits = load_splits(config.data, config.train.seed)
    for name in ("train", "val"):
        if name not in splits or not splits[name].records:
            raise ValueError(f"no {name} images: cannot train")
    (run_dir / "splits").mkdir(exist_ok=True)
    for name, split in splits.items():
        write_records(split.records, run_dir / "splits" / f"{name}.csv")

    tc = config.train
    model = build_model(config.model.name, config.model.weights,
                        image_size=config.data.image_size, drop_rate=config.model.drop_rate,
                        channels_last=tc.channels_last)
    weights = class_weights(splits["train"].labels) \
        if config.data.class_balance == "loss" else (1.0, 1.0)
    augment = (BatchAugment(augment_config(config.data.augment_preset, config.data.hflip))
               if config.data.augment else None)
    module = ClassifierModule(model, tc, weights, augment, epoch_log=run_dir / "epochs.csv",
                              epoch_sink=tracker.log_epoch)
    datamodule = XrayDataModule(splits, config.data, seed=tc.seed)

    checkpointing = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best",
                                    monitor="val_auc", mode="max", save_last=True,
                                    enable_version_counter=False)
    callbacks: list[L.Callback] = [
        checkpointing, EarlyStopping(monitor="val_auc", mode="max", patience=tc.patience),
        *extra_callbacks]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    precision = resolve_precision(tc.precision, tc.accelerator, config.model.name)
    trainer = L.Trainer(
        max_epochs=tc.epochs, accelerator=tc.accelerator, devices=tc.devices,
        strategy=tc.strategy, num_nodes=tc.num_nodes, precision=precision,
        limit_train_batches=tc.limit_train_batches if tc.limit_train_batches <= 1
        else int(tc.limit_train_batches),
        callbacks=callbacks, logger=False,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False,
        log_every_n_steps=10, num_sanity_val_steps=0, default_root_dir=run_dir,
    )
    with warnings.catch_warnings():
        # Intended: augmentation lives in the module's on_after_batch_transfer.
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    if not trainer.is_global_zero:
        # Under DDP only rank 0 selects the threshold, evaluates and writes the model file.
        return RunResult(run_dir, run_dir / MODEL_FILE, float("nan"), {}, 0.0)

    best = checkpointing.best_model_path or str(last)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    model = module.model.cpu().eval()
    log.info("best checkpoint: %s (val AUC %.4f)", best, float(checkpointing.best_model_score or 0))

    ec = config.eval
    val = splits["val"]
    val_probs = predict_proba(model, val.images)
    stressed = stress_probabilities(model, np.asarray(val.images)) \
        if ec.stress_test or ec.threshold_on == "val+stress" else {}
    if ec.threshold_on == "val+stress":
        # Every stress-tested copy keeps its label: choose on the pooled scores.
        pool_labels = np.tile(val.labels, len(stressed) + 1)
        pool_probs = np.concatenate([val_probs, *stressed.values()])
    else:
        pool_labels, pool_probs = val.labels, val_probs
    threshold = choose_threshold(pool_labels, pool_probs, ec.threshold_method,
                                 target_sensitivity=ec.target_sensitivity)
    method = ec.threshold_method + (f"={ec.target_sensitivity}" if ec.target_sensitivity else "") \
        + ("@val+stress" if ec.threshold_on == "val+stress" else "")
    reports = {"val": evaluate_predictions(val.labels, val_probs, threshold, records=val.records,
                                           threshold_method=method, n_bootstrap=ec.n_bootstrap,
                                           seed=ec.bootstrap_seed)}
    write_predictions(run_dir / "predictions_val.csv", val.records, val_probs, threshold)
    if "test" in splits and splits["test"].records:
        test = splits["test"]
        test_probs = predict_proba(model, test.images, progress=progress)
        reports["test"] = evaluate_predictions(
            test.labels, test_probs, threshold, records=test.records, threshold_method=method,
            n_bootstrap=ec.n_bootstrap, seed=ec.bootstrap_seed, group_by=ec.group_by)
        write_predictions(run_dir / "predictions_test.csv", test.records, test_probs, threshold)

    wall = time.perf_counter() - start
    summary = {
        "model": config.model.name, "weights": config.model.weights, "threshold": threshold,
        "threshold_method": method, "best_epoch_checkpoint": Path(best).name,
        "best_val_auc_during_training": float(checkpointing.best_model_score or float("nan")),
        "epochs_run": trainer.current_epoch, "precision": precision, "wall_time_s": round(wall, 1),
        "data": _data_summary(splits), "version": __version__, **reports,
    }
    if stressed:
        summary["val_stress"] = stress_report(val.labels, {"clean": val_probs, **stressed}, threshold)
    write_json(run_dir / "metrics.json", summary)
    info = CheckpointInfo(
        model=config.model.name, preprocessing=model.preprocessing, threshold=float(threshold),
        threshold_method=method, timm_name=model.backbone.pretrained_cfg.get("architecture", ""),
        arch_kwargs=model.arch_kwargs,
        metrics={k: v["at_threshold"]["metrics"] for k, v in reports.items()},
        config=config.to_dict())
    checkpoint = save_checkpoint(run_dir / MODEL_FILE, model, info)
    tracker.log_final(summary)
    tracker.log_artifacts(*(run_dir / name for name in RUN_FILES))
    log.info("run finished in %.0f s: %s", wall, run_dir)
    return RunResult(run_dir, checkpoint, float(threshold), summary, wall)


def with_overrides(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of ``config`` with some fields of some sections replaced."""
    return replace(config, **{name: replace(getattr(config, name), **values)
                              for name, values in sections.items()})
