from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pneumoscope.data.datasets import to_model_input
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from pneumoscope.models.factory import XrayClassifier, build_model
from pneumoscope.site import adapt as adapt_module
from pneumoscope.site.adapt import adapt_batchnorm, adapt_checkpoint, batchnorm_layers

SIZE = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=SIZE, drop_rate=0.5).eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.4)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", model, info)


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unlabelled site films: no class folders, mixed depths, bright exposure (a site shift)."""
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(1)
    for i in range(10):
        folder = root / ("day1" if i < 6 else "day2/extra")
        folder.mkdir(parents=True, exist_ok=True)
        img = np.clip(make_phantom(rng, 40, pneumonia=i % 3 == 0).astype(int) + 40, 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"film{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _no_bn_model() -> XrayClassifier:
    from pneumoscope.models.factory import Preprocessing

    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 1))
    return XrayClassifier(backbone, Preprocessing(SIZE, (0.5,) * 3, (0.25,) * 3))


def test_adapt_changes_only_batchnorm_buffers(ckpt: Path, films: Path, tmp_path: Path) -> None:
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = tmp_path / "adapted.safetensors"
    with pytest.warns(UserWarning, match="only 10 films"):
        result = adapt_checkpoint(ckpt, films, out=out, command="pneumoscope adapt test")
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before
    old_model, _ = load_checkpoint(ckpt)
    new_model, info = load_checkpoint(out)
    old, new = old_model.state_dict(), new_model.state_dict()
    bn_names = {name for name, m in new_model.named_modules() if m in batchnorm_layers(new_model)}
    bn_buffers = {f"{name}.{b}" for name in bn_names
                  for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert result.n_layers == len(bn_names) == 20  # resnet18
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and changed <= bn_buffers
    assert {k for k in changed if k.endswith("running_mean")} == {f"{n}.running_mean" for n in bn_names}
    (step,) = info.provenance
    assert step["step"] == "adapt" and step["method"] == "adabn"
    assert step["command"] == "pneumoscope adapt test"
    assert step["site_data"]["n_films"] == 10 and step["site_data"]["labels_used"] is False
    assert step["site_data"]["fingerprint"] == result.fingerprint and len(result.fingerprint) == 64
    assert info.threshold == 0.4  # kept: recalibrate on labelled films afterwards


def test_adabn_statistics_are_the_site_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=SIZE, drop_rate=0.5)
    model.train()  # adapt must not depend on (or change) the caller's mode
    rng = np.random.default_rng(0)
    images = np.stack([make_phantom(rng, SIZE) for _ in range(12)])
    adapt_batchnorm(model, images, batch_size=64)  # one batch: the running mean is its mean
    assert model.training and model.backbone.bn1.momentum == 0.1
    with torch.no_grad():
        first = model.backbone.conv1(model.normalize(to_model_input(images)))
    torch.testing.assert_close(model.backbone.bn1.running_mean, first.mean((0, 2, 3)))
    assert int(model.backbone.bn1.num_batches_tracked) == 1
    adapt_batchnorm(model, images, batch_size=5)  # 3 batches of 4: an average of batch means
    assert int(model.backbone.bn1.num_batches_tracked) == 3
    torch.testing.assert_close(model.backbone.bn1.running_mean, first.mean((0, 2, 3)))


def test_adapt_refuses_models_without_batchnorm(ckpt: Path, films: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(_no_bn_model(), np.zeros((4, SIZE, SIZE), np.uint8))
    info = CheckpointInfo(model="vit_small_patch16_224", preprocessing=_no_bn_model().preprocessing)
    monkeypatch.setattr(adapt_module, "load_checkpoint", lambda path: (_no_bn_model(), info))
    with pytest.raises(ValueError, match="'vit_small_patch16_224' has no BatchNorm"):
        adapt_checkpoint(ckpt, films, out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_adapt_refuses_bad_folders(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        adapt_checkpoint(ckpt, tmp_path / "missing", out=tmp_path / "a.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        adapt_checkpoint(ckpt, tmp_path / "empty", out=tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="is the input checkpoint"):
        adapt_checkpoint(ckpt, tmp_path / "empty", out=ckpt)
