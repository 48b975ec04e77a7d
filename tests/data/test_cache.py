from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import pneumoscope.data.cache as cache_mod
from pneumoscope.data.cache import cached_images
from pneumoscope.data.records import ImageRecord, load_folder


def test_cache_decodes_once_and_memory_maps(kermany_tree: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    records = load_folder(kermany_tree)["test"]
    first = cached_images(records, 32, tmp_path)
    assert first.images.shape == (len(records), 32, 32)
    assert isinstance(first.images, np.memmap)

    def fail(*_: object) -> None:
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(cache_mod, "load_grayscale", fail)
    second = cached_images(records, 32, tmp_path)
    np.testing.assert_array_equal(first.images, second.images)
    assert second.records == first.records


def test_changed_file_or_size_rebuilds(kermany_tree: Path, tmp_path: Path) -> None:
    records = load_folder(kermany_tree)["val"]
    cached_images(records, 32, tmp_path)
    cached_images(records, 40, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    st = os.stat(records[0].path)
    os.utime(records[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached_images(records, 32, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_unreadable_files_are_skipped_and_counted(kermany_tree: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    records = load_folder(kermany_tree)["val"]
    bad = tmp_path / "tree" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg")
    result = cached_images([*records, ImageRecord(str(bad), 0)], 32, tmp_path / "c")
    assert len(result.records) == len(records)
    assert result.failures and result.failures[0][0] == str(bad)
    assert "IM-9999-0001.jpeg" in result.failures[0][1]
    assert "skipping unreadable image" in caplog.text
