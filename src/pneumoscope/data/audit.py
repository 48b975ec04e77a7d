"""Audit a data folder before training for the problems that silently spoil an evaluation:
exact duplicates across splits, patients in two splits, unreadable files, empty class folders,
stray files (``pneumoscope data check``)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pneumoscope import CLASS_NAMES
from pneumoscope.data.decode import IMAGE_SUFFIXES, ImageDecodeError, load_grayscale
from pneumoscope.data.records import OFFICIAL_SPLITS, ImageRecord, scan_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassCount:
    """Images and unique patients in one split and class."""

    split: str
    class_name: str
    images: int
    patients: int


@dataclass(frozen=True)
class DuplicateGroup:
    """Byte-identical files (same SHA-256); ``splits`` lists the splits they occur in."""

    sha256: str
    paths: tuple[str, ...]
    splits: tuple[str, ...]

    @property
    def crosses_splits(self) -> bool:
        """Copies in two splits leak test images into training."""
        return len(self.splits) > 1


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`check_dataset` found under ``root`` (paths are relative to it)."""

    root: str
    counts: tuple[ClassCount, ...]
    duplicates: tuple[DuplicateGroup, ...]
    unreadable: tuple[tuple[str, str], ...]
    empty_class_folders: tuple[str, ...]
    non_image_files: tuple[str, ...]
    patients_in_several_splits: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def total_images(self) -> int:
        return sum(c.images for c in self.counts)

    @property
    def leaking_duplicates(self) -> tuple[DuplicateGroup, ...]:
        return tuple(g for g in self.duplicates if g.crosses_splits)

    @property
    def ok(self) -> bool:
        """No leakage, no unreadable files, no empty class folders, no stray files."""
        return not (
            self.leaking_duplicates
            or self.unreadable
            or self.empty_class_folders
            or self.non_image_files
            or self.patients_in_several_splits
        )


def _splits_of(root: Path) -> dict[str, Path]:
    """Split folders as :func:`~pneumoscope.data.records.load_folder` reads them."""
    present = {s: root / s for s in OFFICIAL_SPLITS if (root / s).is_dir()}
    return present or {"all": root}


def _class_folders(split_root: Path) -> Iterator[Path]:
    """``split_root`` itself and every folder under it named like a class (any case)."""
    for folder in [split_root, *sorted(p for p in split_root.rglob("*") if p.is_dir())]:
        if folder.name.upper() in CLASS_NAMES:
            yield folder


def _inspect(path: str) -> tuple[str, str | None, str | None]:
    """``(path, sha256 or None for empty files, decode error or None)``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return path, None, f"cannot read file ({exc.strerror or exc})"
    if not data:
        return path, None, "empty file (0 bytes)"
    digest = hashlib.sha256(data).hexdigest()
    try:
        load_grayscale(data)
    except ImageDecodeError as exc:
        return path, digest, str(exc).removeprefix("<bytes>: ")
    return path, digest, None


def check_dataset(
    root: str | Path, *, progress: bool = True, workers: int | None = None
) -> DatasetReport:
    """Audit a data root (``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}`` or a flat class tree).

    Every image is hashed and decoded through :func:`load_grayscale` (``workers`` threads,
    default up to 4). Reports counts and unique patients per split and class, exact duplicate
    groups (flagging those that cross splits), unreadable files, empty or missing class folders,
    non-image files in class folders (dotfiles such as ``.DS_Store`` are ignored), and patients
    found in more than one split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")

    def rel(path: str | Path) -> str:
        return Path(path).relative_to(root).as_posix()

    splits = _splits_of(root)
    records: list[ImageRecord] = []
    empty: list[str] = []
    non_images: list[str] = []
    for split, split_root in splits.items():
        split_records = scan_tree(split_root, split)
        records.extend(split_records)
        image_paths = {r.path for r in split_records}
        for name in CLASS_NAMES:
            if not any(f.name.upper() == name for f in _class_folders(split_root)):
                empty.append(f"{rel(split_root / name)} (missing)")
        for folder in _class_folders(split_root):
            files = [p for p in folder.rglob("*") if p.is_file()]
            if not any(str(p) in image_paths for p in files):
                empty.append(rel(folder) if folder != root else ".")
            non_images.extend(
                rel(p)
                for p in files
                if p.suffix.lower() not in IMAGE_SUFFIXES and not p.name.startswith(".")
            )

    counts = []
    for split in splits:
        for label, name in enumerate(CLASS_NAMES):
            group = [r for r in records if r.split == split and r.label == label]
            counts.append(ClassCount(split, name, len(group), len({r.patient_id for r in group})))

    split_of = {r.path: r.split for r in records}
    n_workers = workers or min(4, os.cpu_count() or 1)
    by_hash: dict[str, list[str]] = defaultdict(list)
    unreadable: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(_inspect, [r.path for r in records])
        for path, digest, error in tqdm(
            results, total=len(records), desc="check", unit="img", disable=not progress
        ):
            if digest is not None:
                by_hash[digest].append(path)
            if error is not None:
                unreadable.append((rel(path), error))

    duplicates = tuple(
        DuplicateGroup(
            digest,
            tuple(rel(p) for p in sorted(paths)),
            tuple(sorted({split_of[p] for p in paths})),
        )
        for digest, paths in sorted(by_hash.items())
        if len(paths) > 1
    )

    patient_splits: dict[str, set[str]] = defaultdict(set)
    for r in records:
        patient_splits[r.patient_id].add(r.split)
    shared = tuple(
        (patient, tuple(sorted(splits)))
        for patient, splits in sorted(patient_splits.items())
        if len(splits) > 1
    )

    report = DatasetReport(
        root=str(root),
        counts=tuple(counts),
        duplicates=duplicates,
        unreadable=tuple(sorted(unreadable)),
        empty_class_folders=tuple(sorted(set(empty))),
        non_image_files=tuple(sorted(set(non_images))),
        patients_in_several_splits=shared,
    )
    status = "ok" if report.ok else "problems found"
    log.info("checked %d images under %s: %s", report.total_images, root, status)
    return report


def format_report(report: DatasetReport, *, max_items: int = 20) -> str:
    """Render a :class:`DatasetReport` as a plain-text table and problem lists.

    Each list shows at most ``max_items`` entries, then how many were left out.
    """

    def listing(title: str, items: list[str]) -> list[str]:
        out = [f"{title}: {len(items) or 'none'}"]
        out += [f"  {item}" for item in items[:max_items]]
        if len(items) > max_items:
            out.append(f"  ... and {len(items) - max_items} more")
        return out

    split_w = max([5, *(len(c.split) for c in report.counts)])
    class_w = max(len(n) for n in CLASS_NAMES)
    lines = [f"Dataset check: {report.root}", ""]
    lines.append(f"{'split':<{split_w}}  {'class':<{class_w}}  {'images':>7}  {'patients':>8}")
    lines.append("-" * len(lines[-1]))
    for c in report.counts:
        lines.append(
            f"{c.split:<{split_w}}  {c.class_name:<{class_w}}  {c.images:>7}  {c.patients:>8}"
        )
    lines.append(f"{'total':<{split_w + class_w + 2}}  {report.total_images:>7}")
    lines.append("")

    dup_items = []
    for g in report.duplicates:
        tag = f"LEAK {'+'.join(g.splits)}" if g.crosses_splits else g.splits[0]
        dup_items.append(f"[{tag}] {g.sha256[:12]}: {', '.join(g.paths)}")
    n_leak = len(report.leaking_duplicates)
    title = "Exact duplicate groups" + (f" ({n_leak} across splits: LEAKAGE)" if n_leak else "")
    lines += listing(title, dup_items)
    lines += listing("Unreadable files", [f"{p}: {why}" for p, why in report.unreadable])
    lines += listing("Empty class folders", list(report.empty_class_folders))
    lines += listing("Non-image files in class folders", list(report.non_image_files))
    lines += listing(
        "Patients in more than one split",
        [f"{p} ({', '.join(s)})" for p, s in report.patients_in_several_splits],
    )
    lines.append("")
    lines.append("Result: OK" if report.ok else "Result: PROBLEMS FOUND (see above)")
    return "\n".join(lines)
