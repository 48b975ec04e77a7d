"""CAM explanations: every registry model, every method, hook hygiene, files, CLI, faithfulness,
and a check that the maps point where the model actually looks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("pytorch_grad_cam", reason="needs the explain extra")

from pneumoscope import CLASS_NAMES
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.explain import cam as cam_mod
from pneumoscope.explain.cam import (
    CAM_METHODS,
    explain,
    explain_files,
    faithfulness,
    format_faithfulness,
    overlay_png,
    overlay_size,
    target_layer,
    title_band_height,
)
from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
from pneumoscope.models.factory import Preprocessing, XrayClassifier, build_model
from pneumoscope.models.registry import ModelSpec, list_specs

# VGG16's CAM layer is at stride 16 and the ViT has 16-px patches: 64 px gives them a 4x4 grid.
BIG_INPUT = {"vgg16": 64, "vit_small_patch16_224": 64}


def _phantom(size: int, pneumonia: bool = True, seed: int = 0) -> np.ndarray:
    return make_phantom(np.random.default_rng(seed), size=size, pneumonia=pneumonia)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def _check(expl: cam_mod.Explanation, size: int) -> None:
    assert expl.heatmap.shape == (size, size) and expl.heatmap.dtype == np.float32
    assert np.isfinite(expl.heatmap).all()
    assert expl.heatmap.min() >= 0.0 and expl.heatmap.max() <= 1.0
    assert 0.0 <= expl.probability <= 1.0 and expl.label in CLASS_NAMES


@pytest.mark.parametrize("spec", list_specs(), ids=lambda s: s.name)
def test_every_registry_model_gives_a_heatmap(spec: ModelSpec) -> None:
    size = BIG_INPUT.get(spec.name, 32)
    torch.manual_seed(0)
    model = build_model(spec.name, "none", image_size=size).eval()
    # A non-square, off-size image: explain resizes it like every other decoding path.
    expl = explain(model, spec.name, _phantom(size + 8)[:, 4:], "gradcam")
    _check(expl, size)
    assert _hook_count(model) == 0 and not model.training


@pytest.fixture(scope="module")
def resnet18() -> XrayClassifier:
    torch.manual_seed(0)
    return build_model("resnet18", "none", image_size=32).eval()


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_on_resnet18(resnet18: XrayClassifier, method: str) -> None:
    x = torch.from_numpy(_phantom(32)).float().div(255)[None, None]  # the tensor form
    layer = target_layer(resnet18, "resnet18")
    expl = explain(resnet18, "resnet18", x, method)
    _check(expl, 32)
    assert expl.method == method and _hook_count(resnet18) == 0
    assert target_layer(resnet18, "resnet18") is layer  # AblationCAM swaps it out while it runs


def test_vit_reshape_follows_the_input_size() -> None:
    model = build_model("vit_small_patch16_224", "none", image_size=64)
    fn = cam_mod.reshape_transform(model, cam_mod.resolve_spec(model, None), (64, 64))
    tokens = torch.randn(2, model.backbone.num_prefix_tokens + 16, 384)
    assert fn(tokens).shape == (2, 384, 4, 4)
    with pytest.raises(ValueError, match="prefix tokens"):
        fn(torch.randn(2, 1 + 15, 384))


def test_model_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=32)
    model.train()
    model.backbone.layer1.requires_grad_(False)
    model.backbone.bn1.eval()  # mixed modes, as when BatchNorm is frozen during fine-tuning
    model.backbone.fc.weight.grad = torch.ones_like(model.backbone.fc.weight)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    layer = target_layer(model, "resnet18")
    for method in ("gradcam", "eigencam"):  # with and without a backward pass
        explain(model, "resnet18", _phantom(32), method)
        assert _hook_count(model) == 0
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(a is b for a, b in zip((p.grad for p in model.parameters()), grads, strict=True))
        assert target_layer(model, "resnet18") is layer

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cam_mod, "_cams", boom)
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, "resnet18", _phantom(32), "gradcam")
    assert _hook_count(model) == 0 and [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_bad_arguments(resnet18: XrayClassifier) -> None:
    with pytest.raises(ValueError, match="unknown CAM method"):
        explain(resnet18, "resnet18", _phantom(32), "nonsense")
    with pytest.raises(ValueError, match="shape"):
        explain(resnet18, "resnet18", torch.rand(1, 1, 40, 40), "gradcam")
    bad = ModelSpec("x", "resnet18", "layer9", "missing layer")
    with pytest.raises(ValueError, match="no module 'layer9'"):
        explain(resnet18, bad, _phantom(32), "gradcam")


def test_overlay_png_decodes_at_the_image_size() -> None:
    image = _phantom(80)[:, :60]
    heat = np.random.default_rng(0).random((32, 32)).astype(np.float32)  # other size: resized
    png = overlay_png(image, heat, "gradcam: PNEUMONIA, p=0.93", min_width=0)
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (60, 80 + title_band_height(60))
    with Image.open(io.BytesIO(overlay_png(image, heat, "small images are enlarged"))) as img:
        assert img.size == overlay_size(80, 60) and img.width == 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=32).eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.4)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", model, info)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_phantom(64, True, 1)).save(root / "a.png")
    Image.fromarray(_phantom(64, False, 2)).convert("RGB").save(root / "b.jpeg")
    Image.fromarray(_phantom(56, True, 3)).save(root / "sub" / "a.png")  # same stem, other folder
    (root / "sub" / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 5)
    return root


def test_explain_files_writes_pairs_and_skips_bad_files(checkpoint: Path, image_folder: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = explain_files(checkpoint, [image_folder], out, methods=("gradcam", "eigencam"),
                         progress=False)
    assert len(rows) == 4
    bad = [r for r in rows if r["error"]]
    assert [Path(r["path"]).name for r in bad] == ["corrupt.jpeg"]
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in CLASS_NAMES and 0 <= r["probability"] <= 1 for r in good)
    for stem in ("a", "b", "a-2"):
        for method in ("gradcam", "eigencam"):
            assert np.load(out / f"{stem}_{method}.npy").shape == (32, 32)
            with Image.open(out / f"{stem}_{method}.png") as img:
                assert img.size == overlay_size(32, 32)
    assert len(list(out.iterdir())) == 12


def test_cli_explain(checkpoint: Path, image_folder: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    from pneumoscope.cli import main

    out = tmp_path / "cli-out"
    code = main(["explain", str(checkpoint), str(image_folder / "a.png"), str(image_folder / "sub"),
                 "--method", "gradcam,hirescam", "--method", "eigencam", "--out", str(out),
                 "--faithfulness"])
    captured = capsys.readouterr()
    assert code == 1  # one file skipped, like `predict`
    assert "corrupt.jpeg" in captured.err and str(out) in captured.out
    assert "most" in captured.out and "eigencam" in captured.out  # the faithfulness table
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{s}_{m}.png" for s in ("a", "a-2") for m in ("gradcam", "hirescam", "eigencam"))
    assert len(list(out.glob("*.npy"))) == 6
    assert main(["explain", str(checkpoint), str(image_folder / "a.png"), "--method", "nope",
                 "--out", str(out)]) == 2


def test_faithfulness_reports_documented_keys(checkpoint: Path) -> None:
    from pneumoscope.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    images = np.stack([_phantom(32, i % 2 == 0, i) for i in range(3)])
    result = faithfulness(model, images, "gradcam", percentiles=(10, 50), spec=info)
    assert set(result) == {"method", "n", "score", "percentiles", "most_relevant_removed",
                           "least_relevant_removed", "gap", "faithful"}
    assert result["n"] == 3 and result["percentiles"] == [10, 50]
    for key in ("most_relevant_removed", "least_relevant_removed", "gap"):
        assert set(result[key]) == {10, 50} and all(np.isfinite(v) for v in result[key].values())
    assert isinstance(result["faithful"], bool)
    assert "gradcam" in format_faithfulness([result])
    with pytest.raises(ValueError, match="percentiles"):
        faithfulness(model, images, "gradcam", percentiles=(0, 50), spec=info)


class _LeftHalfNet(nn.Module):
    """Hand-weighted: a bright-blob detector (the CAM layer), then a head that only reads the
    left half of the detector's map. Its logit does not depend on the right half at all."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0 / 27.0)  # 3x3x3 mean: a smoothed brightness
            self.features[0].bias.fill_(-0.5)  # dark background → 0, bright blob → positive
            self.head.weight.fill_(10.0)
            self.head.bias.fill_(-0.05)  # no blob on the left: NORMAL
        left = torch.zeros(1, 1, size, size)
        left[..., : size // 2] = 1.0
        self.register_buffer("left", left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.features(x) * self.left).mean(dim=(2, 3)))


def _blob_image(size: int, centres: list[tuple[int, int]]) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 25.0)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 8) ** 2] = 255.0
    return img.astype(np.uint8)


def test_cam_points_where_the_model_looks() -> None:
    size = 32
    preprocessing = Preprocessing(image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    model = XrayClassifier(_LeftHalfNet(size), preprocessing).eval()
    spec = ModelSpec("toy", "toy", "features", "hand-weighted toy")

    def share(heat: np.ndarray, rows: slice, cols: slice) -> float:
        return float(heat[rows, cols].sum() / heat.sum())

    half = slice(0, size // 2)
    # One blob, top left: Grad-CAM must put its mass there (a transposed or flipped map fails).
    expl = explain(model, spec, _blob_image(size, [(8, 8)]), "gradcam")
    assert expl.label == "PNEUMONIA"
    assert share(expl.heatmap, slice(None), half) > 0.9 and share(expl.heatmap, half, slice(None)) > 0.9
    # A second blob on the right, which the model never reads. Methods that weight activations
    # element-wise by their gradient ignore it; Grad-CAM's channel-pooled weights cannot (its
    # known weakness, the reason HiResCAM exists), so it is not asserted here.
    both = _blob_image(size, [(8, 8), (24, 24)])
    for method in ("hirescam", "layercam"):
        assert share(explain(model, spec, both, method).heatmap, slice(None), half) > 0.9, method
