"""A temperature-scaled checkpoint exports to ONNX with the temperature inside the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.data.datasets import to_model_input
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from pneumoscope.models.factory import build_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def test_onnx_export_of_a_temperature_scaled_model_matches_torch(tmp_path: Path) -> None:
    from pneumoscope.export import onnx as export

    torch.manual_seed(2)
    model = build_model("resnet18", "none", image_size=32).eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.3)  # spread the logits
    model.set_temperature(2.5)
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, temperature=2.5)
    ckpt = save_checkpoint(tmp_path / "site.safetensors", model, info)
    out = export.export_onnx(ckpt, tmp_path / "site.onnx")  # raises if parity fails

    rng = np.random.default_rng(0)
    images = np.stack([make_phantom(rng, 32, pneumonia=i % 2 == 1) for i in range(6)])
    x = to_model_input(images)
    got = export.ort_session(out).run([export.OUTPUT_NAME], {export.INPUT_NAME: x.numpy()})[0]
    loaded, _ = load_checkpoint(ckpt)
    loaded.set_temperature(1.0)
    with torch.no_grad():
        raw = loaded(x).squeeze(1)
    np.testing.assert_allclose(got, torch.sigmoid(raw / 2.5).numpy(), atol=1e-5)
    # ...and the temperature did change the probabilities.
    assert np.abs(got - torch.sigmoid(raw).numpy()).max() > 1e-3
