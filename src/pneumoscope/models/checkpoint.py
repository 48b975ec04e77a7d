"""Self-describing model files: weights plus everything needed to use them.

A PneumoScope checkpoint is one ``.safetensors`` file (no pickle, so loading cannot run code)
whose metadata holds the model name, class names, preprocessing, the decision threshold chosen
on validation, the config and the metrics. Evaluate, predict, explain, export and serve need
only this file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pneumoscope import CLASS_NAMES, __version__
from pneumoscope.models.factory import Preprocessing, XrayClassifier, rebuild_model

FORMAT = "pneumoscope-checkpoint/1"
_META_KEY = "pneumoscope"


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata that travels with the weights."""

    model: str
    preprocessing: Preprocessing
    threshold: float = 0.5
    threshold_method: str = "default-0.5"
    class_names: tuple[str, ...] = CLASS_NAMES
    timm_name: str = ""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments the architecture was built with."""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["class_names"] = list(self.class_names)
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointInfo:
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported checkpoint format {d.get('format')!r} (expected {FORMAT})")
        fields = {k: v for k, v in d.items() if k != "format"}
        fields["preprocessing"] = Preprocessing.from_dict(fields["preprocessing"])
        fields["class_names"] = tuple(fields.get("class_names", CLASS_NAMES))
        return cls(**fields)


def save_checkpoint(path: str | Path, model: XrayClassifier, info: CheckpointInfo) -> Path:
    """Write weights and metadata to ``path`` (a ``.safetensors`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not info.created:
        info = replace(info, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(info.to_dict())})
    tmp.replace(path)
    return path


def read_info(path: str | Path) -> CheckpointInfo:
    """The metadata of a checkpoint, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a PneumoScope checkpoint (.safetensors): {exc}") from exc
    if _META_KEY not in meta:
        raise ValueError(f"{path} has no PneumoScope metadata: was it written by `pneumoscope train`?")
    return CheckpointInfo.from_dict(json.loads(meta[_META_KEY]))


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", channels_last: bool = False
) -> tuple[XrayClassifier, CheckpointInfo]:
    """Rebuild the model a checkpoint describes and load its weights strictly (eval mode)."""
    from safetensors.torch import load_file

    info = read_info(path)
    model = rebuild_model(info.model, info.preprocessing, arch_kwargs=info.arch_kwargs,
                          channels_last=channels_last)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval(), info
