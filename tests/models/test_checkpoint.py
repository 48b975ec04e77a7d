from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumoscope import CLASS_NAMES
from pneumoscope.models.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from pneumoscope.models.factory import build_model


def test_round_trip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=48).eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.73,
                          threshold_method="youden", metrics={"val": {"auc": 0.9}},
                          config={"train": {"epochs": 1}})
    path = save_checkpoint(tmp_path / "m.safetensors", model, info)
    loaded, got = load_checkpoint(path)
    assert got.threshold == pytest.approx(0.73) and got.class_names == CLASS_NAMES
    assert got.preprocessing == model.preprocessing and got.metrics == {"val": {"auc": 0.9}}
    assert got.created and got.version
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert read_info(path) == got


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_info(tmp_path / "missing.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="not a PneumoScope checkpoint"):
        read_info(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no PneumoScope metadata"):
        read_info(tmp_path / "plain.safetensors")
