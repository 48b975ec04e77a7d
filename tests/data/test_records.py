from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.records import (
    attach_manifest,
    load_folder,
    parse_filename,
    read_records,
    scan_tree,
    write_records,
)


@pytest.mark.parametrize(("name", "patient", "subtype"), [
    ("person123_bacteria_456.jpeg", "person123", "bacteria"),
    ("person1_virus_6.jpeg", "person1", "virus"),
    ("IM-0011-0001.jpeg", "IM-0011", ""),
    ("IM-0011-0001-0002.jpeg", "IM-0011", ""),
    ("NORMAL2-IM-0173-0001-0002.jpeg", "NORMAL2-IM-0173", ""),
    ("NORMAL2-IM-0173-0001.jpeg", "NORMAL2-IM-0173", ""),
    ("scan_0042.png", "scan_0042", ""),
])
def test_parse_filename(name: str, patient: str, subtype: str) -> None:
    assert parse_filename(name) == (patient, subtype)


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(path)


def test_scan_any_tree_depth(tmp_path: Path) -> None:
    _img(tmp_path / "siteA" / "2020" / "NORMAL" / "IM-0001-0001.jpeg")
    _img(tmp_path / "siteA" / "pneumonia" / "person9_virus_1.png")
    (tmp_path / "siteA" / "NORMAL" / "notes.txt").parent.mkdir(parents=True)
    (tmp_path / "siteA" / "NORMAL" / "notes.txt").write_text("not an image")
    _img(tmp_path / "other" / "x.jpeg")  # no class folder: ignored
    records = scan_tree(tmp_path)
    assert [(r.label, r.patient_id, r.subtype) for r in records] == [
        (0, "IM-0001", ""), (1, "person9", "virus")]


def test_load_folder_layouts(kermany_tree: Path, tmp_path: Path) -> None:
    splits = load_folder(kermany_tree)
    assert set(splits) == {"train", "val", "test"}
    assert all(r.split == "test" for r in splits["test"])
    _img(tmp_path / "flat" / "NORMAL" / "a.png")
    _img(tmp_path / "flat" / "PNEUMONIA" / "b.png")
    assert set(load_folder(tmp_path / "flat")) == {"all"}


def test_load_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_folder(tmp_path / "empty")
    _img(tmp_path / "one" / "train" / "NORMAL" / "a.png")
    (tmp_path / "one" / "train" / "PNEUMONIA").mkdir()
    with pytest.raises(ValueError, match=r"PNEUMONIA .*missing or holds no images"):
        load_folder(tmp_path / "one")


def test_records_csv_round_trip_and_manifest(kermany_tree: Path, tmp_path: Path) -> None:
    records = load_folder(kermany_tree)["test"]
    write_records(records, tmp_path / "r.csv")
    assert read_records(tmp_path / "r.csv") == records
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("split,file,site\n" + "".join(
        f"test,{r.file},{'A' if i % 2 else 'B'}\n" for i, r in enumerate(records)))
    attached = attach_manifest(records, manifest)
    assert [r.get("site") for r in attached[:4]] == ["B", "A", "B", "A"]
