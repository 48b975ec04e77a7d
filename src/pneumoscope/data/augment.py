"""Batch augmentation: one random affine resampling plus brightness/contrast per image,
applied to a whole batch at once on the training device.

Per-image torchvision transforms are Python-level work for every image, in the data loader,
on the CPU; one ``grid_sample`` call for the whole batch is one kernel and runs on the GPU
when there is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random changes (defaults: light, anatomy-preserving)."""

    scale: tuple[float, float] = (0.75, 1.0)
    """Share of the image area kept (random resized crop)."""
    ratio: tuple[float, float] = (0.9, 1.1)
    """Aspect-ratio jitter of the crop."""
    degrees: float = 7.0
    translate: float = 0.04
    """Extra shift, as a share of the image size."""
    brightness: float = 0.2
    contrast: float = 0.2
    hflip: bool = False


class BatchAugment(nn.Module):
    """Random resized crop + rotation + shift (+ optional flip) and brightness/contrast on a
    float batch (N, 1, H, W) in [0, 1]; the output has the same shape and range."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config or AugmentConfig()

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device, dtype=torch.float32).uniform_(low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        area = self._uniform(n, *cfg.scale, x)
        log_ratio = self._uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), x)
        aspect = torch.exp(log_ratio)
        # Grid scale < 1 samples a smaller region, i.e. zooms in (a crop resized back).
        sx, sy = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
        angle = self._uniform(n, -cfg.degrees, cfg.degrees, x) * (math.pi / 180.0)
        # The crop may sit anywhere inside the image, plus a small extra shift.
        tx = (torch.rand_like(sx) * 2 - 1) * (1 - sx + 2 * cfg.translate)
        ty = (torch.rand_like(sy) * 2 - 1) * (1 - sy + 2 * cfg.translate)
        if cfg.hflip:
            sx = sx * torch.where(torch.rand_like(sx) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([sx * cos, -sy * sin, tx], 1),
                             torch.stack([sx * sin, sy * cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        brightness = self._uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, x).view(n, 1, 1, 1)
        contrast = self._uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, x).view(n, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * contrast + mean) * brightness
        return out.clamp_(0.0, 1.0)
