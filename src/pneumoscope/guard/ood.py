"""A learned out-of-distribution score: how far an image's generic features lie from the training films.

The score is the squared Mahalanobis distance of pooled features of a *frozen, generic*
ImageNet EfficientNet-Lite0 (the offline package weights) to a Gaussian fitted on training
films, with the Ledoit-Wolf shrunk covariance of scikit-learn. Generic features, not the
classifier's own: fine-tuning keeps only what separates NORMAL from PNEUMONIA, and the
fine-tuned features are nearly blind to what is not a chest film (the team measured AUROC
0.56–0.79 per OOD category, ../shared/notes/gate-feasibility.md), where generic features
separate them.

Which features, measured on validation films, their stress-tested copies, near-OOD films
(:mod:`pneumoscope.guard.probes`) and synthetic non-chest images, 160 px, 2,000 training
films (never on the OOD corpus):

* the last stage (``blocks.6``, 320 channels, average-pooled) separates the near-OOD films
  best at the refuse level (rotated 90°: all refused; a quarter-film crop and upside-down
  films: about half), and every synthetic non-chest kind completely;
* the 1280-d head adds nothing (concatenated: about the same), and shallower stages
  (``blocks.2``, ``blocks.4``) hurt: they describe texture, so noise, blur and JPEG stress
  tests push validation films far out (AUROC up to 1.0 against clean validation) and the
  refuse level that must stay above them rises 3–13 times past the warn level;
* a single Gaussian and class-conditional means (NORMAL, PNEUMONIA; shared covariance) gave
  the same separation, so the scorer uses one Gaussian (it then needs no labels);
* standardising features before the shrinkage changed nothing on ``blocks.6``.

:class:`OODScorer` holds the extractor and the fitted mean and precision as buffers, so the
whole score is one torch graph (exportable to ONNX with the classifier).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from pneumoscope.models.checkpoint import check_arch_kwargs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSpec:
    """Which frozen network the score reads, and how; stored in the gate's metadata."""

    timm_name: str = "efficientnet_lite0"
    timm_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: {"bn_eps": 1e-3, "pad_type": "same"})
    """``timm.create_model`` arguments of the network the weights come from (TF conventions:
    BatchNorm eps 1e-3, "SAME" padding; see :mod:`pneumoscope.models.pretrained`)."""
    weights: str = "efficientnet_lite0"
    """Key of the offline package weights (:data:`~pneumoscope.models.pretrained.PACKAGE_WEIGHTS`)."""
    taps: tuple[str, ...] = ("blocks.6",)
    """Modules (names in timm's ``feature_info``) whose outputs are average-pooled and concatenated."""
    input_mean: float = 127 / 255
    input_std: float = 128 / 255
    """Input normalisation on [0, 1] pixels: TF Lite's ``(x - 127) / 128`` on 0–255."""
    in_chans: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "timm_kwargs", dict(self.timm_kwargs))
        # Read from a model file and handed to timm.create_model: the same allow-list as the
        # classifier's arch_kwargs (timm would otherwise act on e.g. a checkpoint_path).
        check_arch_kwargs(self.timm_kwargs, "feature_spec.timm_kwargs")
        object.__setattr__(self, "taps", tuple(self.taps))
        if not self.taps:
            raise ValueError("feature_spec.taps must name at least one module")
        if not self.input_std > 0:
            raise ValueError(f"feature_spec.input_std must be > 0, got {self.input_std!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["taps"] = list(self.taps)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"feature_spec must be a mapping, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"feature_spec has unknown field(s) {unknown}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ValueError(f"feature_spec is invalid: {exc}") from exc


DEFAULT_FEATURES = FeatureSpec()
"""The measured choice (module docstring): package Lite0, last stage, average-pooled."""


def build_extractor(spec: FeatureSpec, *, pretrained: bool = True) -> tuple[nn.Module, list[int]]:
    """The frozen network of ``spec``, cut after its last tap (eval mode, no gradients), and
    the ``forward_intermediates`` indices of the taps.

    ``pretrained``: load the offline package weights (fitting a new gate); ``False`` builds the
    bare architecture, for weights that come from a checkpoint.
    """
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)
    if pretrained:
        from pneumoscope.models.pretrained import load_package_weights

        load_package_weights(model, spec.weights)
    modules = [info["module"] for info in model.feature_info]
    missing = [t for t in spec.taps if t not in modules]
    if missing:
        raise ValueError(f"feature_spec.taps {missing} are not feature modules of {spec.timm_name} "
                         f"(known: {modules})")
    indices = sorted(modules.index(t) for t in spec.taps)
    # Drop what lies after the last tap (the 1x1 head conv): smaller checkpoint, faster score.
    model.prune_intermediate_layers(indices, prune_head=True)
    model.eval().requires_grad_(False)
    return model, indices


class OODScorer(nn.Module):
    """Squared Mahalanobis distance of frozen generic features to the training films.

    Takes what :class:`~pneumoscope.models.factory.XrayClassifier` takes, float (N, 1, S, S) in
    [0, 1], and returns (N,) scores; larger is less like the training films. Unfitted until
    :meth:`fit` (or a checkpoint) fills the ``center`` and ``precision`` buffers.
    """

    def __init__(self, spec: FeatureSpec = DEFAULT_FEATURES, *, pretrained: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.extractor, self._indices = build_extractor(spec, pretrained=pretrained)
        dim = sum(info["num_chs"] for info in self.extractor.feature_info
                  if info["module"] in spec.taps)
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("precision", torch.zeros(dim, dim))

    @property
    def dim(self) -> int:
        return int(self.center.numel())

    def train(self, mode: bool = True) -> OODScorer:
        # The extractor is frozen: its BatchNorm statistics must never update.
        super().train(mode)
        self.extractor.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) in [0, 1] → pooled features (N, dim)."""
        x = ((x - self.spec.input_mean) / self.spec.input_std).expand(-1, self.spec.in_chans, -1, -1)
        maps = self.extractor.forward_intermediates(x, indices=self._indices, intermediates_only=True)
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x) - self.center
        return ((z @ self.precision) * z).sum(dim=1)

    @torch.inference_mode()
    def extract(self, images: np.ndarray, batch_size: int = 64, desc: str = "features") -> np.ndarray:
        """Pooled features (N, dim) of uint8 (N, S, S) images, batched, with progress logging."""
        from pneumoscope.data.datasets import to_model_input

        device = self.center.device
        out = []
        for start in range(0, len(images), batch_size):
            batch = to_model_input(np.asarray(images[start:start + batch_size])).to(device)
            out.append(self.features(batch).float().cpu().numpy())
            done = min(start + batch_size, len(images))
            if done == len(images) or (start // batch_size) % 10 == 9:
                log.info("%s: %d/%d images", desc, done, len(images))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def fit(self, images: np.ndarray, *, batch_size: int = 64) -> OODScorer:
        """Fit the Gaussian (mean, Ledoit-Wolf precision) on uint8 (N, S, S) training films."""
        from sklearn.covariance import LedoitWolf

        if len(images) < 2:
            raise ValueError(f"fitting the OOD score needs at least 2 images, got {len(images)}")
        feats = self.extract(images, batch_size, desc="fitting the OOD score").astype(np.float64)
        lw = LedoitWolf().fit(feats)
        log.info("OOD score: %d-d features of %d films, Ledoit-Wolf shrinkage %.3f",
                 feats.shape[1], len(feats), lw.shrinkage_)
        self.center.copy_(torch.from_numpy(lw.location_).float())
        self.precision.copy_(torch.from_numpy(lw.precision_).float())
        return self

    @torch.inference_mode()
    def score(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Scores (N,) of uint8 (N, S, S) images (numpy or torch), batched."""
        from pneumoscope.data.datasets import to_model_input

        device = self.center.device
        out = [self(to_model_input(images[start:start + batch_size]).to(device)).float().cpu().numpy()
               for start in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
