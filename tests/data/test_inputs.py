"""The input collector accounts for every path: a row (an entry, maybe with an error) or a
counted, named skip; nothing is opened that could block (a FIFO)."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from pneumoscope.data import inputs as inputs_mod
from pneumoscope.data.inputs import (
    InputEntry,
    collect_inputs,
    parse_shard,
    scan_inputs,
    select_shard,
    shard_of,
)


def _scan_in_thread(patterns: list[str]):
    """scan_inputs with a deadline: opening a FIFO would block forever, so fail instead of hang."""
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.setdefault("scan", scan_inputs(patterns)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "scan_inputs blocked (did it open a FIFO?)"
    return result["scan"]


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A folder with every kind of entry a folder scan can meet."""
    root = tmp_path / "scans"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "b.JPG", "sub/c.dcm", "notes.txt", ".hidden.png"):
        (root / name).write_bytes(b"x")
    (root / os.fsdecode(b"bad\xff.png")).write_bytes(b"x")  # not valid UTF-8
    (root / "broken.png").symlink_to(root / "gone.png")
    (root / "broken-other").symlink_to(root / "gone")
    (root / "loop1.png").symlink_to(root / "loop2.png")
    (root / "loop2.png").symlink_to(root / "loop1.png")
    (root / "sub" / "up").symlink_to(root)  # a folder link back up the tree
    (root / "link-to-a.png").symlink_to(root / "a.png")
    os.mkfifo(root / "pipe.png")
    os.mkfifo(root / "pipe")
    if Path("/dev/null").exists():
        (root / "null.png").symlink_to("/dev/null")
    return root


def test_folder_scan_accounts_for_every_entry(messy: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pneumoscope.data.inputs"):
        scan = _scan_in_thread([str(messy)])
    by_name = {e.path.relative_to(messy).as_posix(): e.error for e in scan.entries}
    bad = os.fsdecode(b"bad\xff.png")
    assert {n for n, err in by_name.items() if err is None} == {"a.png", "b.JPG", "sub/c.dcm", bad}
    assert by_name["broken.png"].startswith("broken symbolic link")
    assert by_name["loop1.png"] == by_name["loop2.png"] == "symbolic link loop"
    assert by_name["pipe.png"].startswith("a FIFO")
    if "null.png" in by_name:
        assert by_name["null.png"].startswith("a character device")
    skipped = {p.relative_to(messy).as_posix(): why for p, why in scan.skipped}
    assert skipped["notes.txt"] == "unknown suffix" and skipped[".hidden.png"] == "hidden"
    assert skipped["broken-other"].startswith("broken symbolic link") and skipped["pipe"] == "a FIFO"
    assert skipped["sub/up"].startswith("folder already scanned")
    assert skipped["link-to-a.png"].startswith("duplicate") or skipped["a.png"].startswith("duplicate")
    # Every entry of the tree is a row or a skip (the two links to a.png: one row, one skip).
    on_disk = {p.relative_to(messy).as_posix() for p in messy.rglob("*") if p.name != "sub"
               and "sub/up/" not in p.as_posix()}
    assert on_disk == set(by_name) | set(skipped)
    assert Counter(scan.skip_counts()) == Counter(
        {"unknown suffix": 1, "hidden": 1, "broken symbolic link": 1, "a FIFO": 1,
         "folder already scanned": 1, "duplicate": 1})
    # Named skips in the log, and one summary line.
    text = caplog.text
    assert "notes.txt: unknown suffix" in text and "pipe: a FIFO" in text
    summary = [r for r in caplog.records if r.getMessage().startswith("inputs:")]
    assert len(summary) == 1 and "6 skipped" in summary[0].getMessage()
    assert [str(e.path) for e in scan.entries] == sorted(str(e.path) for e in scan.entries)


def test_named_paths_always_get_an_entry(messy: Path) -> None:
    names = ["missing.png", "broken.png", "loop1.png", "pipe", "notes.txt", "*.gif"]
    scan = _scan_in_thread([str(messy / n) for n in names])
    errors = {e.path.name: e.error for e in scan.entries}
    assert errors == {"missing.png": "input not found", "broken.png": errors["broken.png"],
                      "loop1.png": "symbolic link loop", "pipe": errors["pipe"],
                      "notes.txt": None, "*.gif": "no files match this pattern"}
    assert errors["broken.png"].startswith("broken symbolic link") and errors["pipe"].startswith("a FIFO")
    empty = messy / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    (entry,) = scan_inputs([str(empty)]).entries
    assert entry.path == empty and entry.error.startswith("no image files")


def test_unreadable_file_is_an_error_row(messy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root chmod does not stop reading, so the permission answer is simulated.
    real = os.access
    monkeypatch.setattr(inputs_mod.os, "access",
                        lambda p, mode: False if Path(p).name == "a.png" else real(p, mode))
    errors = {e.path.name: e.error for e in scan_inputs([str(messy / "a.png"), str(messy / "b.JPG")]).entries}
    assert errors == {"a.png": "cannot read (permission denied)", "b.JPG": None}


def test_collect_inputs_raises_for_what_it_cannot_read(messy: Path) -> None:
    assert collect_inputs([str(messy / "a.png")]) == [messy / "a.png"]
    with pytest.raises(FileNotFoundError, match=r"missing\.png: input not found"):
        collect_inputs([str(messy / "missing.png")])
    with pytest.raises(ValueError, match=r"pipe\.png: a FIFO"):
        collect_inputs([str(messy / "pipe.png")])


@pytest.mark.parametrize("text", ["1", "2/2", "-1/3", "a/b", "0/0", "1/"])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--shard must be I/N"):
        parse_shard(text)


def test_shards_partition_the_inputs_and_do_not_depend_on_the_rest() -> None:
    assert parse_shard("2/5") == (2, 5)
    entries = [InputEntry(Path(f"scans/{i:04d}.png")) for i in range(400)]
    shards = [select_shard(entries, i, 4) for i in range(4)]
    assert sorted((e for s in shards for e in s), key=lambda e: str(e.path)) == entries
    assert all(60 < len(s) < 140 for s in shards), [len(s) for s in shards]  # roughly even
    # A file's shard is its own: adding files never moves it (so shards can be resumed).
    more = [InputEntry(Path(f"new/{i}.png")) for i in range(100)] + entries
    assert [e for e in select_shard(more, 1, 4) if e in entries] == shards[1]
    assert shard_of(os.fsdecode(b"bad\xff.png"), 4) in range(4)
    assert select_shard(entries, 0, 1) == entries
