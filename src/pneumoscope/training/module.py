"""The LightningModule: loss, optimiser, schedule, frozen-backbone warm-up, validation AUC."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.config import TrainConfig
from pneumoscope.data.augment import BatchAugment
from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.models.factory import XrayClassifier
from pneumoscope.runs import append_epoch_row, drop_epoch_rows


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ClassifierModule(L.LightningModule):
    """Binary pneumonia classifier around an :class:`XrayClassifier`.

    ``class_weights`` (NORMAL, PNEUMONIA) weight the loss per sample; pass ``(1, 1)`` when the
    sampler already balances the classes. ``epoch_sink(epoch, row)`` receives each epoch's
    row of ``epochs.csv`` too (on rank 0), e.g. an experiment tracker's ``log_epoch``.
    """

    def __init__(self, model: XrayClassifier, config: TrainConfig,
                 class_weights: tuple[float, float] = (1.0, 1.0),
                 augment: BatchAugment | None = None, epoch_log: Path | None = None,
                 epoch_sink: Callable[[int, dict[str, object]], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.augment = augment
        self.epoch_log = epoch_log
        self.epoch_sink = epoch_sink
        self._train_losses: list[float] = []
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))
        self._val_probs: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).squeeze(1)

    def step_seeds(self) -> tuple[int, int]:
        """Seeds of this training step's randomness (dropout on the global RNG, augmentation on
        its own generator): a function of (seed, rank, optimiser step) alone, so a run resumed
        from a checkpoint draws exactly what the uninterrupted run drew, with no RNG state to
        save, and the DDP processes augment differently."""
        state = np.random.SeedSequence([self.config.seed, self.global_rank, self.global_step])
        model_seed, augment_seed = state.generate_state(2)
        return int(model_seed), int(augment_seed)

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor],
                                dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._trainer is None or not self.trainer.training:
            return batch  # validation and test stay untouched
        model_seed, augment_seed = self.step_seeds()
        torch.manual_seed(model_seed)
        if self.augment is not None:
            # Augment whole training batches on the device.
            self.augment.seed(augment_seed)
            x, y = batch
            return self.augment(x), y
        return batch

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, weighted: bool) -> torch.Tensor:
        eps = self.config.label_smoothing
        target = y * (1 - eps) + 0.5 * eps
        weight = self.class_weights[y.long()] if weighted else None
        return F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight)

    def on_train_epoch_start(self) -> None:
        # Frozen-backbone warm-up: only the new head learns for the first freeze_epochs,
        # so large early gradients do not wreck the pretrained features.
        frozen = self.config.linear_probe or self.current_epoch < self.config.freeze_epochs
        head = {id(p) for p in self.model.head_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in head or not frozen)
        if self.config.linear_probe:
            # A true probe: frozen features, so BatchNorm keeps its ImageNet statistics too.
            head_modules = set(self.model.backbone.get_classifier().modules())
            for module in self.model.backbone.modules():
                if module not in head_modules and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self(x), y, weighted=True)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        self._train_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self._val_probs.append(torch.sigmoid(logits.float()).detach())
        self._val_labels.append(y.detach())

    def on_validation_epoch_start(self) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            # DDP keeps the parameters equal, but each process moved its BatchNorm statistics on
            # its own last batch: score validation with rank 0's, the ones its checkpoint keeps.
            # (DDP's forward broadcasts buffers too, on the first batch after a training step;
            # done here it does not hang on that detail.)
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _gathered_validation(self) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and labels of the whole validation split. Under DDP each process scored
        its own unpadded share (uneven lengths), so the shares are gathered as objects."""
        probs = torch.cat(self._val_probs).float().cpu().numpy() if self._val_probs else np.empty(0)
        labels = torch.cat(self._val_labels).cpu().numpy() if self._val_labels else np.empty(0)
        self._val_probs.clear()
        self._val_labels.clear()
        if self._trainer is None or self.trainer.world_size == 1:
            return probs, labels
        shares: list[tuple[np.ndarray, np.ndarray] | None] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(shares, (probs, labels))
        return (np.concatenate([s[0] for s in shares if s is not None]),
                np.concatenate([s[1] for s in shares if s is not None]))

    def on_validation_epoch_end(self) -> None:
        probs, labels = self._gathered_validation()
        if self.trainer.sanity_checking:
            return
        m = binary_metrics(labels.astype(int), np.clip(probs, 0.0, 1.0), 0.5)
        row = {"val_loss": m["log_loss"], "val_auc": m["auc"], "val_pr_auc": m["pr_auc"],
               "val_accuracy_at_0.5": m["accuracy"]}
        self.log_dict(row, prog_bar=True, sync_dist=False)
        train_loss = float(np.mean(self._train_losses)) if self._train_losses else None
        self._train_losses.clear()
        if (self.epoch_log is not None or self.epoch_sink is not None) and self.trainer.is_global_zero:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else None
            epoch_row = {"epoch": self.current_epoch, "train_loss": train_loss, **row,
                         "lr": lr, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if self.epoch_log is not None:
                self._append_epoch_row(epoch_row)
            if self.epoch_sink is not None:
                self.epoch_sink(self.current_epoch, epoch_row)

    def on_train_start(self) -> None:
        # A run resumed from the checkpoint of epoch k-1 redoes epoch k: drop a row of epoch k
        # (or later) that an interrupted run wrote after validation but before its checkpoint.
        if self.epoch_log is not None and self.trainer.is_global_zero:
            drop_epoch_rows(self.epoch_log, self.current_epoch)

    def _append_epoch_row(self, row: dict[str, object]) -> None:
        """One row per epoch in ``epochs.csv`` (see :func:`pneumoscope.runs.append_epoch_row`)."""
        append_epoch_row(self.epoch_log, row)

    def configure_optimizers(self):
        cfg = self.config
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            # No weight decay on norms and biases: the usual AdamW recipe.
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
