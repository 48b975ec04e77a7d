from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.config import load_config
from pneumoscope.data.augment import AugmentConfig, BatchAugment
from pneumoscope.data.datasets import (
    XrayDataModule,
    class_weights,
    load_pneumoniamnist,
    load_splits,
    to_model_input,
)
from pneumoscope.data.synthetic import write_pneumoniamnist_npz


def test_pneumoniamnist_keeps_official_splits(tmp_path: Path) -> None:
    path = write_pneumoniamnist_npz(tmp_path / "pm.npz")
    splits = load_pneumoniamnist(path, 32)
    with np.load(path) as npz:
        for name in ("train", "val", "test"):
            assert splits[name].images.shape == (len(npz[f"{name}_labels"]), 32, 32)
            np.testing.assert_array_equal(splits[name].labels, npz[f"{name}_labels"].ravel())
    config = load_config(dotted=[f"data.root={path}", "data.image_size=28"]).data
    assert load_splits(config, 0)["val"].images.shape[1:] == (28, 28)
    assert list(load_splits(config, 0, only=("val",))) == ["val"]


def test_load_splits_decodes_only_the_splits_asked_for(kermany_tree: Path) -> None:
    config = load_config(dotted=[f"data.root={kermany_tree}", "data.image_size=32"]).data
    val = load_splits(config, 0, only=("val",))
    assert list(val) == ["val"]
    assert not any(r.split == "test" for r in val["val"].records)
    np.testing.assert_array_equal(val["val"].images, load_splits(config, 0)["val"].images)


def test_pneumoniamnist_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="not a PneumoniaMNIST file"):
        load_pneumoniamnist(tmp_path / "bad.npz", 28)
    with pytest.raises(FileNotFoundError):
        load_pneumoniamnist(tmp_path / "missing.npz", 28)


def test_class_weights_balance_the_loss() -> None:
    labels = np.array([0] * 26 + [1] * 74)
    w0, w1 = class_weights(labels)
    assert w0 * 26 == pytest.approx(w1 * 74) == pytest.approx(50)
    with pytest.raises(ValueError, match="both classes"):
        class_weights(np.ones(5, dtype=int))


def test_sampler_draws_classes_evenly(kermany_tree: Path) -> None:
    config = load_config(dotted=[f"data.root={kermany_tree}", "data.image_size=32",
                                 "data.batch_size=8", "data.class_balance=sampler"]).data
    splits = load_splits(config, 0)
    loader = XrayDataModule(splits, config, seed=0).train_dataloader()
    labels = torch.cat([y for _ in range(20) for _, y in loader])
    assert 0.4 < labels.mean().item() < 0.6  # the tree itself is 60% pneumonia, 40% normal
    x, _ = next(iter(loader))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and x.max() <= 1


def test_batch_augment_changes_images_but_keeps_shape_and_range() -> None:
    torch.manual_seed(0)
    x = to_model_input(np.random.default_rng(0).integers(0, 255, (6, 40, 40), dtype=np.uint8))
    out = BatchAugment()(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.01
    identity = BatchAugment(AugmentConfig(scale=(1, 1), ratio=(1, 1), degrees=0, translate=0,
                                          brightness=0, contrast=0))
    torch.testing.assert_close(identity(x), x, atol=1e-4, rtol=0)


def test_gamma_only_augment_is_a_per_image_power_law() -> None:
    from pneumoscope.config import AUGMENT_PRESETS as CONFIG_PRESETS
    from pneumoscope.data.augment import AUGMENT_PRESETS, augment_config

    assert tuple(AUGMENT_PRESETS) == CONFIG_PRESETS
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16) * 0.98 + 0.01
    out = BatchAugment(AugmentConfig(scale=(1, 1), ratio=(1, 1), degrees=0, translate=0,
                                     brightness=0, contrast=0, gamma=(0.5, 2.0)))(x)
    # Each image is x ** g for one g in [0.5, 2], the same g over all its pixels.
    g = (out.clamp(min=1e-6).log() / x.log()).flatten(1)
    assert torch.allclose(g, g[:, :1].expand_as(g), atol=2e-2)
    assert ((g[:, 0] >= 0.5 - 1e-3) & (g[:, 0] <= 2.0 + 1e-3)).all() and g[:, 0].std() > 0.05
    assert augment_config("strong", hflip=True).hflip and augment_config("light") == AugmentConfig()
    with pytest.raises(ValueError, match="unknown augmentation preset 'wild'"):
        augment_config("wild")
    with pytest.raises(ValueError, match="augment gamma must be a range"):
        AugmentConfig(gamma=(1.5, 0.5))


def test_blur_and_noise_augment() -> None:
    from pneumoscope.data.augment import augment_config

    none = dict(scale=(1, 1), ratio=(1, 1), degrees=0, translate=0, brightness=0, contrast=0)
    x = torch.zeros(3, 1, 8, 224)  # 224 wide: blur sigmas are given at 224 px
    x[:, :, :, 112:] = 1.0  # a vertical edge
    torch.manual_seed(0)
    blurred = BatchAugment(AugmentConfig(**none, blur=3.0))(x)
    # Blur keeps the mean (replicate padding), softens the edge, differs between images.
    torch.testing.assert_close(blurred.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-3, rtol=0)
    assert (blurred[:, 0, :, 111] > 0.01).all() and (blurred[:, 0, :, 112] < 0.99).all()
    assert not torch.allclose(blurred[0], blurred[1])
    # sigma 0 is the identity.
    torch.testing.assert_close(BatchAugment._blur(x, torch.zeros(3)), x)
    flat = torch.full((4, 1, 64, 64), 0.5)
    noisy = BatchAugment(AugmentConfig(**none, noise=0.1))(flat)
    stds = (noisy - flat).flatten(1).std(1)
    assert (stds <= 0.1 + 0.01).all() and stds.max() > 0.02 and noisy.min() >= 0 and noisy.max() <= 1
    strong = augment_config("texture")
    assert strong.noise > 0 and strong.blur > 0 and strong.gamma != (1.0, 1.0)
    with pytest.raises(ValueError, match="augment noise must be >= 0"):
        AugmentConfig(noise=-0.1)


def test_numpy_model_input_matches_the_torch_one() -> None:
    from pneumoscope.data.datasets import to_model_input, to_model_input_numpy

    images = np.random.default_rng(0).integers(0, 256, (3, 9, 7), dtype=np.uint8)
    for x in (images, images[0]):
        got = to_model_input_numpy(x)
        assert got.dtype == np.float32 and got.shape == (len(x) if x.ndim == 3 else 1, 1, 9, 7)
        np.testing.assert_array_equal(got, to_model_input(x).numpy())
