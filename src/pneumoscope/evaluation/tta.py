"""Test-time augmentation: a small fixed set of views of each image, logits averaged.

The views are torch ops on the model-input tensor (grayscale (N, 1, H, W) in [0, 1], after
decoding and resizing), so evaluate, predict and the library function see the same views and
no image file is re-decoded. Each view is one more forward pass (5 views: 5x the inference
cost). The fixed set stays small and mild (identity, ±5 % scale, ±3° rotation): a chest film's
position and size vary about that much between acquisitions, while flips would move the heart.

A model file records whether its threshold was chosen under TTA (``CheckpointInfo.tta``, the
view names; set by training with ``eval.tta: true``): the threshold is an operating point of
the probabilities made that way, so evaluate, predict and serve then use the same views by
default (:func:`resolve_tta`), and ``--no-tta`` / ``--tta`` against the file log a warning.
Off by default: 5x the inference cost for a gain a validation study has to show.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class View:
    """One fixed transform of the model input about the image centre."""

    name: str
    scale: float = 1.0
    """> 1 zooms in (the content grows), < 1 zooms out (edges replicated into the margin)."""
    degrees: float = 0.0
    """Rotation of the content, counter-clockwise on screen."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and 0.5 <= self.scale <= 2.0):
            raise ValueError(f"view {self.name!r}: scale must be in [0.5, 2], got {self.scale!r}")
        if not (math.isfinite(self.degrees) and abs(self.degrees) <= 45.0):
            raise ValueError(f"view {self.name!r}: degrees must be in [-45, 45], got {self.degrees!r}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.degrees == 0.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) seen through this view; the identity returns ``x`` itself."""
        if self.is_identity:
            return x
        # affine_grid maps each output pixel to the input point it samples: the inverse of the
        # wanted content transform. With y pointing down, turning the content counter-clockwise
        # on screen by a is [[cos, sin], [-sin, cos]]; its inverse, scaled by 1/s, is below.
        a = math.radians(self.degrees)
        cos, sin = math.cos(a) / self.scale, math.sin(a) / self.scale
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


IDENTITY = View("identity")
TTA_VIEWS: tuple[View, ...] = (
    IDENTITY,
    View("scale+5%", scale=1.05),
    View("scale-5%", scale=0.95),
    View("rotate+3deg", degrees=3.0),
    View("rotate-3deg", degrees=-3.0),
)
"""The fixed set ``--tta`` uses."""


def tta_logits(model: nn.Module, x: torch.Tensor, views: Sequence[View] = TTA_VIEWS) -> torch.Tensor:
    """The mean of ``model``'s logits over ``views`` of ``x`` (one forward pass per view)."""
    if not views:
        raise ValueError("tta_logits needs at least one view")
    return torch.stack([model(view.apply(x)).float() for view in views]).mean(0)


VIEWS_BY_NAME: dict[str, View] = {view.name: view for view in TTA_VIEWS}
"""The views a model file may name (``CheckpointInfo.tta``): this version implements these."""


def view_names(views: Sequence[View] | None) -> tuple[str, ...]:
    """What a model file or a report records of ``views`` (``()``: no TTA)."""
    return tuple(view.name for view in views or ())


def resolve_tta(recorded: Sequence[str], requested: bool | None, *,
                where: str = "model file") -> tuple[View, ...] | None:
    """The views to predict with, for a model file whose threshold was chosen under the views
    named ``recorded`` (``CheckpointInfo.tta``; empty: without TTA) and a caller's flag:
    ``None`` follows the file, ``True`` asks for TTA, ``False`` for none. The one place that
    decides it (evaluate, predict and serve call it). Going against the file logs a warning:
    the threshold is only the chosen operating point for probabilities made the same way."""
    unknown = [name for name in recorded if name not in VIEWS_BY_NAME]
    if unknown:  # load_checkpoint refuses such files already; an ONNX sidecar may not have
        raise ValueError(f"{where}: unknown test-time augmentation view(s) {unknown}; this version "
                         f"knows {sorted(VIEWS_BY_NAME)}")
    chosen = tuple(VIEWS_BY_NAME[name] for name in recorded)
    if requested is None or requested == bool(chosen):
        return chosen or None
    if requested:
        log.warning("%s: test-time augmentation on, but its threshold was chosen without it: the "
                    "operating point (sensitivity/specificity) may shift", where)
        return TTA_VIEWS
    log.warning("%s: test-time augmentation off (--no-tta), but its threshold was chosen with it "
                "(%s): the operating point (sensitivity/specificity) may shift", where,
                ", ".join(recorded))
    return None
