"""Finding labelled images on disk: Kermany layout, any NORMAL/PNEUMONIA tree, file-name parsing."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pneumoscope import CLASS_NAMES
from pneumoscope.data.decode import IMAGE_SUFFIXES
from pneumoscope.jsonio import write_text_atomic

OFFICIAL_SPLITS: tuple[str, ...] = ("train", "val", "test")

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
# NORMAL files: `IM-0011-0001.jpeg`, `NORMAL2-IM-0173-0001-0002.jpeg`: patient = prefix + IM-NNNN.
_NORMAL = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image. ``label`` is 1 for PNEUMONIA, 0 for NORMAL."""

    path: str
    label: int
    split: str = ""
    patient_id: str = ""
    subtype: str = ""
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def file(self) -> str:
        return Path(self.path).name

    def get(self, key: str, default: str = "") -> str:
        """A manifest column attached through :func:`attach_manifest`."""
        return dict(self.extra).get(key, default)


def parse_filename(name: str) -> tuple[str, str]:
    """Return ``(patient_id, subtype)`` parsed from a Kermany file name.

    >>> parse_filename("person123_bacteria_456.jpeg")
    ('person123', 'bacteria')
    >>> parse_filename("NORMAL2-IM-0173-0001-0002.jpeg")
    ('NORMAL2-IM-0173', '')

    Names that follow neither pattern use the file stem as the patient id (one image = one
    patient), the safe choice for grouping.
    """
    base = Path(name).name
    if m := _PERSON.match(base):
        return m.group(1).lower(), m.group(2).lower()
    if m := _NORMAL.match(base):
        return m.group(1).upper(), ""
    return Path(base).stem, ""


def _class_of(folder: str) -> int | None:
    upper = folder.upper()
    return CLASS_NAMES.index(upper) if upper in CLASS_NAMES else None


def scan_tree(root: str | Path, split: str = "") -> list[ImageRecord]:
    """All images under ``root`` whose nearest class folder is NORMAL or PNEUMONIA.

    Works for ``ROOT/{NORMAL,PNEUMONIA}`` and for deeper trees (e.g. ``site/2020/NORMAL/x.png``).
    Files are sorted so the result does not depend on the file system's order.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    records = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        label = next(
            (c for c in map(_class_of, reversed(path.relative_to(root).parts[:-1])) if c is not None),
            None,
        )
        if label is None:
            continue
        patient, subtype = parse_filename(path.name)
        records.append(ImageRecord(str(path), label, split, patient, subtype))
    return records


def _check_classes(records: Sequence[ImageRecord], where: str) -> None:
    if not records:
        raise ValueError(f"no images found under {where} (expected NORMAL/ and PNEUMONIA/ folders "
                         f"holding {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    for label, name in enumerate(CLASS_NAMES):
        if not any(r.label == label for r in records):
            raise ValueError(f"class folder {name} under {where} is missing or holds no images")


def load_folder(root: str | Path) -> dict[str, list[ImageRecord]]:
    """Read a data root into splits.

    ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}`` gives those splits (``val`` may be missing,
    as in the Mendeley zip); a plain ``ROOT/{NORMAL,PNEUMONIA}`` tree comes back as one split
    named ``all`` (e.g. an external test site).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    present = [s for s in OFFICIAL_SPLITS if (root / s).is_dir()]
    if not present:
        records = scan_tree(root, "all")
        _check_classes(records, str(root))
        return {"all": records}
    splits = {s: scan_tree(root / s, s) for s in present}
    for s in ("train", "test"):
        if s in splits:
            _check_classes(splits[s], str(root / s))
    return splits


def attach_manifest(records: Iterable[ImageRecord], manifest: str | Path) -> list[ImageRecord]:
    """Attach the columns of a manifest CSV (joined on file name, and on split when the
    manifest has one) to each record; records not in the manifest keep no extra columns."""
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "file" not in rows[0]:
        raise ValueError(f"manifest {manifest} needs a 'file' column")
    by_key = {(row.get("split", ""), row["file"]): row for row in rows}
    by_file = {row["file"]: row for row in rows}
    out = []
    for r in records:
        row = by_key.get((r.split, r.file)) or by_file.get(r.file)
        out.append(replace(r, extra=tuple(sorted(row.items()))) if row else r)
    return out


def write_records(records: Iterable[ImageRecord], path: str | Path) -> None:
    """Save records (e.g. a split) as CSV so a run can be audited and reproduced (atomically)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["path", "label", "split", "patient_id", "subtype"])
    for r in records:
        writer.writerow([r.path, r.label, r.split, r.patient_id, r.subtype])
    write_text_atomic(path, buf.getvalue())


def read_records(path: str | Path) -> list[ImageRecord]:
    """Inverse of :func:`write_records`."""
    with open(path, newline="") as fh:
        return [
            ImageRecord(row["path"], int(row["label"]), row["split"], row["patient_id"], row["subtype"])
            for row in csv.DictReader(fh)
        ]
