from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoscope.data.records import ImageRecord, load_folder
from pneumoscope.data.splits import grouped_folds, grouped_split, make_splits, patient_overlap, subsample


def _records(n_patients: int = 200, seed: int = 0) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        label = int(rng.random() < 0.74)
        for k in range(int(rng.integers(1, 6))):
            out.append(ImageRecord(f"/x/p{p}_{k}.jpeg", label, "train", f"p{p}"))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_no_patient_on_both_sides(seed: int) -> None:
    records = _records(seed=seed)
    rest, held = grouped_split(records, 0.15, seed)
    assert not patient_overlap(rest, held)
    assert len(rest) + len(held) == len(records)
    assert 0.08 < len(held) / len(records) < 0.25
    # Stratified: the held-out prevalence is close to the pool's.
    prevalence = np.mean([r.label for r in records])
    assert abs(np.mean([r.label for r in held]) - prevalence) < 0.1


def test_split_is_seeded() -> None:
    records = _records()
    assert grouped_split(records, 0.2, 1) == grouped_split(records, 0.2, 1)
    assert grouped_split(records, 0.2, 1) != grouped_split(records, 0.2, 2)


def test_grouped_folds_hold_each_record_out_once_by_patient() -> None:
    records = _records()
    folds = grouped_folds(records, 4, 3)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(records)))
    for rest, out in folds:
        assert sorted([*rest, *out]) == list(range(len(records)))
        assert not patient_overlap([records[i] for i in rest], [records[i] for i in out])
    assert grouped_split(records, 0.25, 3) == ([records[i] for i in folds[0][0]],
                                               [records[i] for i in folds[0][1]])
    with pytest.raises(ValueError, match="at least 2 folds"):
        grouped_folds(records, 1, 0)
    with pytest.raises(ValueError, match="only 3 patients: too few for 5"):
        grouped_folds(_records(3), 5, 0)


def test_make_splits_keeps_official_test_and_merges_val(kermany_tree: Path) -> None:
    found = load_folder(kermany_tree)
    splits = make_splits(found, 0.2, seed=0)
    assert splits["test"] == found["test"]
    pool = {r.path for r in found["train"] + found["val"]}
    assert {r.path for r in splits["train"] + splits["val"]} == pool
    assert not patient_overlap(splits["train"], splits["val"])


def test_flat_tree_gets_grouped_train_val_test() -> None:
    splits = make_splits({"all": _records()}, 0.15, seed=3)
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not patient_overlap(splits[a], splits[b])


def test_subsample_and_errors() -> None:
    records = _records()
    small = subsample(records, 0.25, 0)
    assert 0.15 < len(small) / len(records) < 0.35
    assert subsample(records, 1.0, 0) == records
    with pytest.raises(ValueError, match="fraction"):
        grouped_split(records, 1.5, 0)
    with pytest.raises(ValueError, match="patients"):
        grouped_split(records[:3], 0.2, 0)
