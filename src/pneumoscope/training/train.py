"""Fit one model: data → model → Lightning fit → the best validation epoch's weights.

Training only trains. Choosing the threshold, the stress tests, the test evaluation and
packaging the model file happen afterwards in :mod:`pneumoscope.evaluation.finalize`; the
whole run (fit, then finalize, tracked in MLflow) is :func:`pneumoscope.pipeline.train`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

from pneumoscope.config import RunConfig
from pneumoscope.data.augment import BatchAugment, augment_config
from pneumoscope.data.datasets import SplitData, XrayDataModule, class_weights
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.models.factory import XrayClassifier, build_model
from pneumoscope.models.registry import get_spec
from pneumoscope.runs import RunLayout
from pneumoscope.training.module import ClassifierModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """The trained network (best validation epoch, on the CPU, eval mode) and how it got there."""

    model: XrayClassifier
    best_checkpoint: Path
    best_val_auc: float
    epochs_run: int
    precision: str
    is_global_zero: bool = True
    """False on the other DDP ranks: only rank 0 finalizes and writes the run's files."""


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


def initial_model(config: RunConfig) -> XrayClassifier:
    """The network a run starts from: ``model.init`` (an existing PneumoScope model file, e.g.
    to fine-tune at a site: its architecture, preprocessing, source conventions and weights) or
    a new ``model.name`` with ``model.weights``."""
    mc, tc = config.model, config.train
    if mc.init is None:
        return build_model(mc.name, mc.weights, image_size=config.data.image_size,
                           drop_rate=mc.drop_rate, channels_last=tc.channels_last)
    model, info = load_checkpoint(mc.init, channels_last=tc.channels_last)
    if not isinstance(model, XrayClassifier):
        raise ValueError(f"model.init {mc.init} is a deep ensemble of {len(model)} members: an "
                         "ensemble is not trained; start from one of its member runs' model files")
    if info.model != mc.name:
        raise ValueError(f"model.init {mc.init} is a {info.model!r} model, not model.name "
                         f"{mc.name!r}: leave --model out, or pass --model {info.model}")
    if info.preprocessing.image_size != config.data.image_size:
        raise ValueError(f"model.init {mc.init} takes {info.preprocessing.image_size} px images, "
                         f"not data.image_size {config.data.image_size}")
    model.set_temperature(1.0)  # the loss needs raw logits; calibrate again after fine-tuning
    if hasattr(model.backbone, "drop_rate"):  # timm reads it in forward_head
        model.backbone.drop_rate = mc.drop_rate
    log.info("starting from %s (%s, threshold %.3f)", mc.init, info.model, info.threshold)
    return model.train()


def fit(config: RunConfig, splits: dict[str, SplitData], *, resume: bool = False,
        progress: bool = True, epoch_sink: Callable[[int, dict[str, Any]], None] | None = None,
        callbacks: Sequence[L.Callback] = ()) -> FitResult:
    """Train ``config.model`` on ``splits["train"]``, keep the epoch with the best validation
    AUC. ``resume`` continues from the run folder's ``checkpoints/last.ckpt``; ``epoch_sink``
    gets every epoch's row of ``epochs.csv`` (a tracker's ``log_epoch``); ``callbacks`` are
    extra Lightning callbacks (e.g. a benchmark's timers)."""
    layout = RunLayout(config.run_dir)
    for name in ("train", "val"):
        if name not in splits or not splits[name].records:
            raise ValueError(f"no {name} images: cannot train")
    tc = config.train
    model = initial_model(config)
    weights = class_weights(splits["train"].labels) \
        if config.data.class_balance == "loss" else (1.0, 1.0)
    augment = (BatchAugment(augment_config(config.data.augment, config.data.hflip))
               if config.data.augment != "none" else None)
    module = ClassifierModule(model, tc, weights, augment, epoch_log=layout.epochs,
                              epoch_sink=epoch_sink)
    datamodule = XrayDataModule(splits, config.data, seed=tc.seed)

    checkpointing = ModelCheckpoint(dirpath=layout.checkpoints_dir, filename="best",
                                    monitor="val_auc", mode="max", enable_version_counter=False)
    # last.ckpt after every epoch, for --resume. (Lightning's save_last writes it only in the
    # epochs that improve the monitored value, so a resume would redo every epoch since then.)
    # A kill mid-epoch therefore restarts that epoch, which replays exactly: the data order is
    # a function of (seed, epoch), the random draws of (seed, rank, step).
    latest = ModelCheckpoint(dirpath=layout.checkpoints_dir, filename=layout.last_checkpoint.stem,
                             save_top_k=1, enable_version_counter=False)
    all_callbacks: list[L.Callback] = [
        checkpointing, latest, EarlyStopping(monitor="val_auc", mode="max", patience=tc.patience),
        *callbacks]
    if progress:
        all_callbacks.append(TQDMProgressBar(refresh_rate=10))
    precision = resolve_precision(tc.precision, tc.accelerator, config.model.name)
    trainer = L.Trainer(
        max_epochs=tc.epochs, accelerator=tc.accelerator, devices=tc.devices,
        strategy=tc.strategy, num_nodes=tc.num_nodes, precision=precision,
        limit_train_batches=tc.limit_train_batches if tc.limit_train_batches <= 1
        else int(tc.limit_train_batches),
        callbacks=all_callbacks, logger=False,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False,
        log_every_n_steps=10, num_sanity_val_steps=0, default_root_dir=layout.root,
        # XrayDataModule shares the data out itself (unpadded validation, seeded order).
        use_distributed_sampler=False,
    )
    if trainer.world_size > 1 and trainer.is_global_zero:
        log.info("DDP: %d processes x batch %d = %d images per optimiser step; train.lr %g is "
                 "used as given (not scaled with the process count)", trainer.world_size,
                 config.data.batch_size, trainer.world_size * config.data.batch_size, tc.lr)
    with warnings.catch_warnings():
        # Intended: augmentation lives in the module's on_after_batch_transfer.
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
        # Under DDP every process logs the same validation numbers (computed on all of it).
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=".*It is recommended to use `self.log.*sync_dist=True")
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=str(layout.last_checkpoint) if resume else None)
    best = Path(checkpointing.best_model_path or layout.last_checkpoint)
    score = float(checkpointing.best_model_score) if checkpointing.best_model_score is not None \
        else float("nan")
    if not trainer.is_global_zero:
        return FitResult(module.model, best, score, trainer.current_epoch, precision, False)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    log.info("best checkpoint: %s (val AUC %.4f)", best, score)
    return FitResult(module.model.cpu().eval(), best, score, trainer.current_epoch, precision)
