"""Decode and resize each image once; later epochs and runs read a memory-mapped uint8 array.

The cache key covers the file list (path, byte size, mtime), the image size and the decoder
version, so a changed file or size builds a new cache instead of serving stale pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pneumoscope.data.decode import ImageDecodeError, load_grayscale, resize_square
from pneumoscope.data.records import ImageRecord

log = logging.getLogger(__name__)

DECODER_VERSION = 2
"""Bump when decoding or resizing changes, so old caches are not reused (2: large JPEGs and
DICOMs are decoded at a reduced scale, see :data:`pneumoscope.data.decode.DRAFT_MARGIN`)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("PNEUMOSCOPE_CACHE", Path.home() / ".cache" / "pneumoscope"))


@dataclass(frozen=True)
class SplitData:
    """Decoded images of a record list: ``images[i]`` is the uint8 picture of ``records[i]``;
    ``records`` excludes files that failed to decode."""

    images: np.ndarray
    """uint8 array (N, size, size), memory-mapped when it came from the cache."""
    records: list[ImageRecord]
    failures: tuple[tuple[str, str], ...] = ()
    """``(path, reason)`` for every file that could not be decoded (skipped, not fatal)."""

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)


def _key(records: Sequence[ImageRecord], size: int) -> str:
    h = hashlib.sha256(f"v{DECODER_VERSION}:{size}".encode())
    for r in records:
        try:
            st = os.stat(r.path)
            h.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{r.path}\0missing\n".encode())
    return h.hexdigest()[:24]


def _decode(path: str, size: int) -> np.ndarray | str:
    try:
        return resize_square(load_grayscale(path, draft_size=size), size)
    except ImageDecodeError as exc:
        return str(exc)


def decode_images(
    records: Sequence[ImageRecord], size: int, *, desc: str = "decoding", workers: int = 2
) -> SplitData:
    """Decode and resize ``records`` in memory (no cache). Unreadable files are skipped with a
    warning and listed in ``failures``."""
    images = np.empty((len(records), size, size), dtype=np.uint8)
    kept: list[ImageRecord] = []
    failures: list[tuple[str, str]] = []
    # Pillow releases the GIL while decoding, so threads give real parallelism here.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda r: _decode(r.path, size), records)
        for record, result in tqdm(zip(records, results, strict=True), total=len(records),
                                   desc=desc, unit="img", leave=False, disable=len(records) < 200):
            if isinstance(result, str):
                failures.append((record.path, result))
                continue
            images[len(kept)] = result
            kept.append(record)
    for path, reason in failures:
        log.warning("skipping unreadable image %s", reason or path)
    return SplitData(images[: len(kept)], kept, tuple(failures))


def cached_images(
    records: Sequence[ImageRecord], size: int, cache_dir: str | Path | None = None, *,
    desc: str = "decoding",
) -> SplitData:
    """Like :func:`decode_images`, but stored under ``cache_dir`` and memory-mapped on reuse."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _key(records, size)
    array_path = cache_dir / f"{key}.npy"
    index_path = cache_dir / f"{key}.json"
    if array_path.is_file() and index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            images = np.load(array_path, mmap_mode="r")
            by_path = {r.path: r for r in records}
            kept = [by_path[p] for p in index["kept"]]
            if images.shape == (len(kept), size, size):
                log.info("using cached images %s (%d images)", array_path, len(kept))
                return SplitData(images, kept, tuple(tuple(f) for f in index["failures"]))
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable cache %s; rebuilding", array_path)
    result = decode_images(records, size, desc=desc)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write to temporary names and rename: an interrupted run never leaves a torn cache.
        # Per-process names: DDP ranks may build the same cache at the same time.
        tmp_array = array_path.with_suffix(f".{os.getpid()}.tmp.npy")
        tmp_index = index_path.with_suffix(f".{os.getpid()}.tmp")
        np.save(tmp_array, result.images)
        tmp_index.write_text(json.dumps({
            "kept": [r.path for r in result.records], "failures": result.failures, "size": size,
        }))
        os.replace(tmp_array, array_path)
        os.replace(tmp_index, index_path)
        images = np.load(array_path, mmap_mode="r")
        return SplitData(images, result.records, result.failures)
    except OSError as exc:
        log.warning("could not write image cache in %s (%s); continuing without it", cache_dir, exc)
        return result
