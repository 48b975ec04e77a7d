"""The synthetic phantoms every other test relies on: shapes, file layout, and that the class
signal is real (learnable from the lungs) but not a global brightness shift."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from pneumoscope import CLASS_NAMES
from pneumoscope.data.decode import load_grayscale
from pneumoscope.data.records import parse_filename
from pneumoscope.data.synthetic import (
    KERMANY_COUNTS,
    make_phantom,
    write_kermany_tree,
    write_pneumoniamnist_npz,
)


@pytest.mark.parametrize("size", [28, 64, 128])
def test_phantom_shape_dtype_and_range(size: int) -> None:
    rng = np.random.default_rng(0)
    for pneumonia in (False, True):
        img = make_phantom(rng, size, pneumonia=pneumonia)
        assert img.shape == (size, size)
        assert img.dtype == np.uint8
        # A dark background and bright tissue, not a flat or saturated frame.
        assert img.min() < 60 and img.max() > 150


def test_phantom_is_seeded_and_varies() -> None:
    a = make_phantom(np.random.default_rng(7), 64, pneumonia=True)
    b = make_phantom(np.random.default_rng(7), 64, pneumonia=True)
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(7)
    normals = [make_phantom(rng, 64) for _ in range(4)]
    assert all(not np.array_equal(normals[0], n) for n in normals[1:])
    with pytest.raises(ValueError, match="size"):
        make_phantom(rng, 8)


def test_kermany_tree_layout_and_names(kermany_tree: Path) -> None:
    patients_by_split: dict[str, set[str]] = {}
    suffixes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    for split, (n_normal, n_pneumonia) in KERMANY_COUNTS.items():
        patients_by_split[split] = set()
        for label, (name, expected) in enumerate(zip(CLASS_NAMES, (n_normal, n_pneumonia),
                                                     strict=True)):
            files = sorted((kermany_tree / split / name).iterdir())
            assert len(files) == expected, (split, name)
            per_patient: Counter[str] = Counter()
            for path in files:
                patient, subtype = parse_filename(path.name)
                if label:
                    assert patient.startswith("person")
                    assert subtype in {"bacteria", "virus"}
                else:
                    assert patient.startswith(("IM-", "NORMAL2-IM-"))
                    assert subtype == ""
                per_patient[patient] += 1
                suffixes[path.suffix] += 1
                with Image.open(path) as img:
                    modes[img.mode] += 1
                gray = load_grayscale(path)
                assert gray.shape == (96, 96) and gray.dtype == np.uint8
            # Several images per patient, so splitting by image would leak patients.
            assert max(per_patient.values()) == 3
            patients_by_split[split] |= set(per_patient)
    assert set(suffixes) == {".jpeg", ".png"}
    assert set(modes) == {"L", "RGB"}
    assert any(p.startswith("NORMAL2-") for ps in patients_by_split.values() for p in ps)
    splits = list(patients_by_split.values())
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not a & b, "a patient appears in two splits"


def test_kermany_tree_is_deterministic(tmp_path: Path) -> None:
    counts = {"train": (4, 5), "test": (2, 3)}
    trees = [write_kermany_tree(tmp_path / str(i), counts, size=32, seed=3) for i in range(2)]
    other = write_kermany_tree(tmp_path / "other", counts, size=32, seed=4)

    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert contents(trees[0]) == contents(trees[1])
    assert len(contents(trees[0])) == 14
    assert contents(other) != contents(trees[0])


def test_pneumoniamnist_npz(tmp_path: Path) -> None:
    path = write_pneumoniamnist_npz(tmp_path / "pneumoniamnist.npz", seed=1)
    assert path == tmp_path / "pneumoniamnist.npz"
    expected = {"train": (30, 50), "val": (10, 10), "test": (10, 20)}
    with np.load(path) as data:
        assert set(data.files) == {f"{s}_{k}" for s in expected for k in ("images", "labels")}
        for split, (n_normal, n_pneumonia) in expected.items():
            images, labels = data[f"{split}_images"], data[f"{split}_labels"]
            assert images.shape == (n_normal + n_pneumonia, 28, 28)
            assert labels.shape == (n_normal + n_pneumonia, 1)
            assert images.dtype == labels.dtype == np.uint8
            assert np.bincount(labels[:, 0], minlength=2).tolist() == [n_normal, n_pneumonia]
        first = data["train_images"].copy()
    with np.load(write_pneumoniamnist_npz(tmp_path / "again.npz", seed=1)) as again:
        np.testing.assert_array_equal(again["train_images"], first)


def _phantoms(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    images = np.stack([make_phantom(rng, 64, pneumonia=bool(y)) for y in labels])
    return images, labels


def _downsample(images: np.ndarray, size: int = 16) -> np.ndarray:
    small = [Image.fromarray(x).resize((size, size), Image.Resampling.BOX) for x in images]
    return np.stack([np.asarray(x, dtype=np.float64).ravel() / 255.0 for x in small])


def _mean(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).mean(axis=1, keepdims=True)


def test_class_signal_is_spatial_not_global_brightness() -> None:
    train_x, train_y = _phantoms(200, seed=11)
    test_x, test_y = _phantoms(200, seed=12)
    # Pixels of the lungs separate the classes, even for a linear model on 16x16 thumbnails...
    pixels = LogisticRegression(max_iter=2000).fit(_downsample(train_x), train_y)
    pixel_auc = roc_auc_score(test_y, pixels.decision_function(_downsample(test_x)))
    assert pixel_auc > 0.9
    # ...while the mean intensity alone stays close to chance.
    brightness = LogisticRegression().fit(_mean(train_x), train_y)
    mean_auc = roc_auc_score(test_y, brightness.decision_function(_mean(test_x)))
    assert mean_auc < 0.75
    assert pixel_auc - mean_auc > 0.2
