"""Unsupervised adaptation to a new site: AdaBN (Li et al., "Revisiting Batch Normalization
For Practical Domain Adaptation", 2016).

A BatchNorm layer normalises with the running mean and variance of the training films. Films
from another scanner or exposure shift those statistics, and everything downstream shifts with
them. AdaBN re-estimates every BatchNorm layer's running statistics on the site's own
(unlabelled) films and changes nothing else: no weight is trained, no label is read. The
decision threshold is kept; the score distribution moves, so recalibrate afterwards when
labelled local films exist (``pneumoscope calibrate``).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscope.data.cache import cached_images
from pneumoscope.data.datasets import to_model_input
from pneumoscope.jsonio import json_safe
from pneumoscope.models.checkpoint import load_checkpoint, read_extra_tensors, save_checkpoint
from pneumoscope.site.common import check_output, find_images, fingerprint, provenance_entry

log = logging.getLogger(__name__)

BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                                nn.SyncBatchNorm)
"""timm's BatchNormAct2d subclasses BatchNorm2d, so it is covered."""

MIN_FILMS = 50
"""Below this many films the re-estimated statistics are noisy; adapt warns."""


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt_checkpoint` did."""

    out: Path
    n_films: int
    n_layers: int
    fingerprint: str
    warnings: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (for ``--json`` output or a report)."""
        return json_safe({**asdict(self), "out": str(self.out)})


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers that keep running statistics (the ones AdaBN can re-estimate)."""
    return [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray, *, batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm layer's running statistics on uint8 (N, S, S) ``images``, in
    place; returns the number of layers. Only BatchNorm buffers change.

    Statistics are reset and accumulated with ``momentum=None`` (a plain average over batches),
    with only the BatchNorm layers in train mode: dropout and drop-path stay off. Batches are
    of near-equal size so each film weighs about the same in the average.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers with running statistics: "
                         "AdaBN cannot adapt it (LayerNorm/GroupNorm models such as ViT or "
                         "ConvNeXt normalise each film by itself); use calibrate instead")
    n = len(images)
    if n < 2:
        raise ValueError(f"AdaBN needs at least 2 films, got {n}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (BatchNorm statistics), got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        for idx in np.array_split(np.arange(n), math.ceil(n / batch_size)):
            model(to_model_input(np.asarray(images[idx])).to(device))
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(layers)


def adapt_checkpoint(
    checkpoint: str | Path, unlabeled_dir: str | Path, *, out: str | Path, batch_size: int = 64,
    cache_dir: str | Path | None = None, command: str | None = None, overwrite: bool = False,
) -> AdaptResult:
    """AdaBN: re-estimate the BatchNorm statistics of ``checkpoint`` on every image found under
    ``unlabeled_dir`` (any layout; class folders, if present, are ignored) and write the
    adapted model to ``out``, a new checkpoint whose provenance records the step.

    Refuses models without BatchNorm, an ``out`` equal to the input and (unless ``overwrite``)
    an existing ``out``. The threshold is kept: calibrate afterwards on labelled local films.
    """
    checkpoint, out, unlabeled_dir = Path(checkpoint), Path(out), Path(unlabeled_dir)
    check_output(checkpoint, out, overwrite)
    records = find_images(unlabeled_dir)
    model, info = load_checkpoint(checkpoint)
    if not batchnorm_layers(model):
        raise ValueError(f"{checkpoint}: model {info.model!r} has no BatchNorm layers, so AdaBN "
                         "cannot adapt it; use calibrate (threshold/temperature) instead")
    decoded = cached_images(records, info.preprocessing.image_size, cache_dir,
                            desc="decoding site films")
    n = len(decoded.records)
    if n == 0:
        raise ValueError(f"no readable images under {unlabeled_dir} ({len(decoded.failures)} unreadable)")
    messages = []
    if n < MIN_FILMS:
        messages.append(f"AdaBN on only {n} films (fewer than {MIN_FILMS}): the re-estimated "
                        "BatchNorm statistics are noisy; check the adapted model on labelled "
                        "local films before use")
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    n_layers = adapt_batchnorm(model, np.asarray(decoded.images), batch_size=batch_size)
    digest = fingerprint(unlabeled_dir, [r.path for r in decoded.records])
    step = provenance_entry(
        "adapt", checkpoint, unlabeled_dir, command=command, method="adabn",
        site_data={"fingerprint": digest, "n_films": n, "n_unreadable": len(decoded.failures),
                   "labels_used": False},
        batchnorm_layers=n_layers, batch_size=batch_size,
        previous={"threshold": info.threshold, "threshold_method": info.threshold_method,
                  "temperature": info.temperature},
        note="threshold and temperature kept from before adaptation; recalibrate on labelled "
             "local films",
        warnings=messages,
    )
    # The input gate travels unchanged: it reads generic features that AdaBN does not touch.
    save_checkpoint(out, model, replace(info, provenance=(*info.provenance, step), created=""),
                    extra_tensors=read_extra_tensors(checkpoint))
    log.info("adapted %d BatchNorm layers of %s on %d films of %s -> %s", n_layers, checkpoint,
             n, unlabeled_dir, out)
    return AdaptResult(out, n, n_layers, digest, tuple(messages), step)
