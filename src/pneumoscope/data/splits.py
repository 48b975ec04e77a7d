"""Patient-grouped, stratified splits: no patient's images end up on both sides."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscope.data.records import ImageRecord


def grouped_split(
    records: Sequence[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split records into ``(rest, held_out)`` with about ``fraction`` of them held out,
    grouped by ``patient_id`` and stratified by label (scikit-learn's StratifiedGroupKFold)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    if len(records) < 2:
        raise ValueError(f"need at least 2 images to split, got {len(records)}")
    n_splits = max(2, round(1.0 / fraction))
    n_groups = len({r.patient_id or r.path for r in records})
    if n_groups < n_splits:
        raise ValueError(f"only {n_groups} patients: too few for a {fraction:.0%} grouped split")
    rest_idx, held_idx = grouped_folds(records, n_splits, seed)[0]
    return [records[i] for i in rest_idx], [records[i] for i in held_idx]


def grouped_folds(records: Sequence[ImageRecord], n_folds: int,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` pairs ``(rest, held_out)`` of indices into ``records``: every record is held
    out in exactly one fold, grouped by ``patient_id`` and stratified by label (scikit-learn's
    StratifiedGroupKFold, the same folds :func:`grouped_split` draws its first from)."""
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    labels = np.array([r.label for r in records])
    groups = np.array([r.patient_id or r.path for r in records])
    n_groups = len(set(groups.tolist()))
    if n_groups < n_folds:
        raise ValueError(f"only {n_groups} patients: too few for {n_folds} patient-grouped folds")
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(records)), labels, groups))


def subsample(records: Sequence[ImageRecord], fraction: float, seed: int) -> list[ImageRecord]:
    """A patient-grouped, stratified share of ``records`` (all of them when fraction is 1)."""
    if fraction >= 1.0:
        return list(records)
    rest, kept = grouped_split(records, fraction, seed)
    del rest
    return kept


def make_splits(
    found: dict[str, list[ImageRecord]], val_fraction: float, seed: int
) -> dict[str, list[ImageRecord]]:
    """Turn the folders found on disk into train/val/test.

    Validation is drawn from the train pool (official train + the official 16-image val
    folder, which is too small to select anything on), grouped by patient. The official test
    split is returned untouched. A flat NORMAL/PNEUMONIA tree (``all``) is split into
    train/val/test, all grouped by patient.
    """
    if "all" in found:
        pool, test = grouped_split(found["all"], 0.2, seed)
    else:
        if "train" not in found:
            raise ValueError("no train/ folder found: cannot train on this data root")
        pool = found["train"] + found.get("val", [])
        test = found.get("test", [])
    train, val = grouped_split(pool, val_fraction, seed)
    return {"train": train, "val": val, "test": test}


def patient_overlap(a: Sequence[ImageRecord], b: Sequence[ImageRecord]) -> set[str]:
    """Patient ids present in both collections (empty for a leak-free split)."""
    return {r.patient_id for r in a} & {r.patient_id for r in b}
