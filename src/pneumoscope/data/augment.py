"""Batch augmentation: one random affine resampling plus brightness/contrast per image,
applied to a whole batch at once on the training device.

Per-image torchvision transforms are Python-level work for every image, in the data loader,
on the CPU; one ``grid_sample`` call for the whole batch is one kernel and runs on the GPU
when there is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    gamma: tuple[float, float] = (1.0, 1.0)
    """Range of a per-image gamma (drawn log-uniformly): exposure / film-response changes."""
    noise: float = 0.0
    """Largest std of added Gaussian pixel noise (per image, uniform from 0), on the [0, 1] scale."""
    blur: float = 0.0
    """Largest Gaussian blur sigma (per image, uniform from 0), in pixels of a 224 px image."""
    hflip: bool = False

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "gamma"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(f"augment {name} must be a range 0 < low <= high, got {(low, high)}")
        for name in ("degrees", "translate", "brightness", "contrast", "noise", "blur"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment {name} must be >= 0, got {getattr(self, name)}")


# Wider crops/rotations and exposure changes (brightness, contrast, gamma): films from
# another time or device differ most in exposure and framing, not in anatomy.
_STRONG = AugmentConfig(scale=(0.6, 1.0), ratio=(0.85, 1.15), degrees=10.0, translate=0.06,
                        brightness=0.3, contrast=0.3, gamma=(0.7, 1.4))
AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "light": AugmentConfig(),
    "strong": _STRONG,
    # ``strong`` plus sharpness and grain: detector noise, blur and processing differ between
    # devices, and a model that reads fine texture as disease calls such normals pneumonia.
    "texture": replace(_STRONG, noise=0.04, blur=1.5),
}
"""Named augmentation strengths (``data.augment_preset``)."""


def augment_config(preset: str, hflip: bool = False) -> AugmentConfig:
    """The :data:`AUGMENT_PRESETS` entry ``preset``, with the flip setting applied."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; expected one of "
                         f"{sorted(AUGMENT_PRESETS)}")
    return replace(AUGMENT_PRESETS[preset], hflip=hflip)


class BatchAugment(nn.Module):
    """Random resized crop + rotation + shift (+ optional flip), brightness/contrast/gamma and
    optional blur and noise, on a float batch (N, 1, H, W) in [0, 1]; the output has the same
    shape and range.

    After :meth:`seed`, the draws come from a dedicated generator (on the batch's device), so
    they are a function of that seed alone: training seeds it per step, which makes a resumed
    run augment exactly as an uninterrupted one. Unseeded, the global RNG is used."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config or AugmentConfig()
        self._seed: int | None = None
        self._generator: torch.Generator | None = None

    def seed(self, seed: int) -> None:
        """Draw the next batches from a generator seeded with ``seed``."""
        self._seed, self._generator = seed, None

    def _start(self, device: torch.device) -> None:
        if self._seed is not None and (self._generator is None or self._generator.device != device):
            self._generator = torch.Generator(device=device).manual_seed(self._seed)

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device, dtype=torch.float32).uniform_(
            low, high, generator=self._generator)

    def _rand(self, like: torch.Tensor) -> torch.Tensor:
        return torch.rand(like.shape, device=like.device, dtype=like.dtype, generator=self._generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        self._start(x.device)
        area = self._uniform(n, *cfg.scale, x)
        log_ratio = self._uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), x)
        aspect = torch.exp(log_ratio)
        # Grid scale < 1 samples a smaller region, i.e. zooms in (a crop resized back).
        sx, sy = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
        angle = self._uniform(n, -cfg.degrees, cfg.degrees, x) * (math.pi / 180.0)
        # The crop may sit anywhere inside the image, plus a small extra shift.
        tx = (self._rand(sx) * 2 - 1) * (1 - sx + 2 * cfg.translate)
        ty = (self._rand(sy) * 2 - 1) * (1 - sy + 2 * cfg.translate)
        if cfg.hflip:
            sx = sx * torch.where(self._rand(sx) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([sx * cos, -sy * sin, tx], 1),
                             torch.stack([sx * sin, sy * cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        brightness = self._uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, x).view(n, 1, 1, 1)
        contrast = self._uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, x).view(n, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (((out - mean) * contrast + mean) * brightness).clamp_(0.0, 1.0)
        if cfg.gamma != (1.0, 1.0):
            log_gamma = self._uniform(n, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), x)
            # Floored at 1e-6 before the power (black stays within 1e-4 of black).
            out = out.clamp_(min=1e-6).pow_(torch.exp(log_gamma).view(n, 1, 1, 1).to(out.dtype))
        if cfg.blur > 0:
            out = self._blur(out, self._uniform(n, 0.0, cfg.blur * x.shape[-1] / 224, x))
        if cfg.noise > 0:
            std = self._uniform(n, 0.0, cfg.noise, x).view(n, 1, 1, 1).to(out.dtype)
            noise = torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=self._generator)
            out = (out + noise * std).clamp_(0.0, 1.0)
        return out

    @staticmethod
    def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with one sigma per image (one grouped convolution per axis)."""
        n, c, h, w = x.shape
        radius = max(1, math.ceil(3 * float(sigma.max())))
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
        # A tiny sigma makes a delta kernel, i.e. no blur for that image.
        kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)
        y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
        y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
        y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
        return y.view(n, c, h, w)
