"""Explanations cost what the model input costs, not what the upload costs (issue #13, item 1):
absurd aspect ratios are refused by the decoder itself, and overlays have a bounded size."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pytorch_grad_cam")

from pneumoscope.data.decode import MAX_ASPECT, ImageDecodeError, decode_image
from pneumoscope.explain.cam import (
    MAX_OVERLAY_SIDE,
    explain_files,
    overlay_png,
    overlay_size,
    title_band_height,
)
from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
from pneumoscope.models.factory import build_model


def _png(height: int, width: int) -> bytes:
    gradient = np.linspace(30, 220, height * width).reshape(height, width)
    buf = io.BytesIO()
    Image.fromarray(gradient.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("height", "width"), [(3000, 8), (8, 3000), (2100, 100)])
def test_the_decoder_refuses_absurd_aspect_ratios(height: int, width: int) -> None:
    with pytest.raises(ImageDecodeError, match=rf"sliver: image is {width}x{height} pixels, an aspect "
                                               rf"ratio above {MAX_ASPECT:g}:1"):
        decode_image(_png(height, width), name="sliver")


def test_twenty_to_one_is_still_an_image() -> None:
    assert decode_image(_png(400, 20)).gray.shape == (400, 20)
    assert decode_image(_png(20, 400)).gray.shape == (20, 400)


@pytest.mark.parametrize(("height", "width"), [(5000, 250), (250, 5000), (4000, 4000), (10, 10)])
def test_overlays_have_a_bounded_size(height: int, width: int) -> None:
    out_w, out_h = overlay_size(height, width)
    image_h = out_h - title_band_height(out_w)
    assert max(out_w, image_h) <= MAX_OVERLAY_SIDE
    assert out_w / image_h == pytest.approx(width / height, rel=0.02)  # aspect kept
    with Image.open(io.BytesIO(overlay_png(np.zeros((height, width), np.uint8),
                                           np.ones((8, 8), np.float32), "t"))) as img:
        assert img.size == (out_w, out_h)


def test_an_overlay_of_a_long_image_needs_little_memory() -> None:
    # 5000 x 250 (20:1, legal). Before the cap the overlay enlarged it to 256 x 5120 and built
    # float64 colour arrays over it (> 60 MB of numpy memory); now it is 51 x 1024, in uint8.
    gray = np.full((5000, 250), 120, np.uint8)
    heat = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    tracemalloc.start()
    try:
        png = overlay_png(gray, heat, "gradcam: NORMAL, p=0.10")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"overlay peak {peak / 2**20:.1f} MiB"
    with Image.open(io.BytesIO(png)) as img:
        assert max(img.size) <= MAX_OVERLAY_SIDE + 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=32).eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", model, info)


def test_cli_explain_gives_a_per_file_error_for_a_sliver(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "sliver.png").write_bytes(_png(3000, 8))
    (tmp_path / "long.png").write_bytes(_png(2000, 100))  # 20:1: explained
    rows = {Path(r["path"]).name: r for r in explain_files(
        checkpoint, [tmp_path / "sliver.png", tmp_path / "long.png"], tmp_path / "out", progress=False)}
    assert "aspect ratio above 20:1" in rows["sliver.png"]["error"] and rows["sliver.png"]["outputs"] == {}
    assert rows["long.png"]["error"] is None and rows["long.png"]["label"] in ("NORMAL", "PNEUMONIA")
