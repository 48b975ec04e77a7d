from __future__ import annotations

import os
import time
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
    # A touched file with the same bytes is the same image: the entry is reused.
    st = os.stat(records[0].path)
    os.utime(records[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached_images(records, 32, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_new_content_with_the_same_size_and_mtime_is_not_served_stale(tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i, value in enumerate((40, 200)):
        paths.append(tmp_path / "tree" / f"IM-000{i}-0001.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((16, 16), value, np.uint8)).save(paths[-1])
    records = [ImageRecord(str(p), 0) for p in paths]
    first = cached_images(records, 16, tmp_path / "c")
    assert first.images[0].max() == 40
    # Same size and mtime, other pixels: what a (size, mtime) key would serve stale.
    st = paths[0].stat()
    Image.fromarray(np.full((16, 16), 99, np.uint8)).save(paths[0])
    assert paths[0].stat().st_size == st.st_size  # a flat 16x16 PNG: same size whatever the value
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert paths[0].stat().st_mtime_ns == st.st_mtime_ns
    second = cached_images(records, 16, tmp_path / "c")
    assert second.images[0].max() == 99


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_no_temporary_file_survives_a_failed_write(kermany_tree: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   error: BaseException) -> None:
    records = load_folder(kermany_tree)["val"]
    real_replace = os.replace

    def replace_then_fail(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith(".json"):  # the array is in place, the index not yet
            raise error
        real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", replace_then_fail)
    if isinstance(error, OSError):
        result = cached_images(records, 32, tmp_path)  # a cache that cannot be written: no cache
        assert len(result.records) == len(records)
    else:
        with pytest.raises(KeyboardInterrupt):
            cached_images(records, 32, tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    assert isinstance(cached_images(records, 32, tmp_path).images, np.memmap)  # rebuilt whole


def test_cache_is_pruned_least_recently_used_first(kermany_tree: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    records = load_folder(kermany_tree)["val"]
    keys = {}
    for size in (16, 24, 32):
        cached_images(records, size, tmp_path)
        keys[size] = cache_mod._key(records, size)
    entry = {size: (tmp_path / f"{k}.npy").stat().st_size + (tmp_path / f"{k}.json").stat().st_size
             for size, k in keys.items()}
    for age, size in ((300, 16), (200, 24), (100, 32)):  # 16 px: the least recently used ...
        os.utime(tmp_path / f"{keys[size]}.npy", (time.time() - age,) * 2)
    cached_images(records, 16, tmp_path)  # ... until this hit uses it again
    stale_tmp = tmp_path / f"{keys[16]}.123.tmp.npy"  # left by a killed run, two hours ago
    stale_tmp.write_bytes(b"x")
    os.utime(stale_tmp, (time.time() - 7200,) * 2)
    # Room for the new 40 px entry and one other: the 24 px entry (least recent) goes first.
    limit = entry[16] + entry[32] + 40 * 40 * len(records) + 4096
    monkeypatch.setenv(cache_mod.MAX_GB_ENV, str(limit / 1e9))
    cached_images(records, 40, tmp_path)
    left = {p.stem for p in tmp_path.glob("*.npy")}
    assert keys[24] not in left and keys[16] in left and cache_mod._key(records, 40) in left
    assert not stale_tmp.exists()
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= limit
    monkeypatch.setenv(cache_mod.MAX_GB_ENV, "lots")
    with pytest.raises(ValueError, match="PNEUMOSCOPE_CACHE_MAX_GB must be a number"):
        cache_mod.max_cache_bytes()


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
