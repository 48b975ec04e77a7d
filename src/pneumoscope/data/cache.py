"""Decode and resize each image once; later epochs and runs read a memory-mapped uint8 array.

The cache key covers the file list (each path and a hash of its bytes: BLAKE2b), the image
size and the decoder version. Content, not (size, mtime): a file rewritten with the same size
and its mtime put back (``os.utime``, ``cp -p``, some sync tools) builds a new cache instead of
serving stale pixels. The price is reading every file's bytes once per run (no decoding),
in threads.

Entries are written to temporary names and renamed, and the temporaries are removed whatever
happens (a ``kill -9`` aside: those are removed by the next run that writes, once an hour
old). The folder is pruned after each write to at most ``PNEUMOSCOPE_CACHE_MAX_GB``
(default :data:`DEFAULT_MAX_GB`), least recently used entries first; a hit marks its entry used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pneumoscope.data.decode import ImageDecodeError, load_grayscale, resize_square
from pneumoscope.data.records import ImageRecord

log = logging.getLogger(__name__)

DECODER_VERSION = 3
"""Bump when decoding or resizing changes, so old caches are not reused (2: JPEG/PNG/DICOM
only, alpha dropped instead of composited on black; 3: large JPEGs and DICOMs are decoded at a
reduced scale, see :data:`pneumoscope.data.decode.DRAFT_MARGIN`)."""

MAX_GB_ENV = "PNEUMOSCOPE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
"""Default bound of the cache folder (the Kermany release at 224 px is about 0.3 GB an entry)."""

STALE_TMP_SECONDS = 3600
"""A temporary file older than this is left over from a killed run and is removed."""

_TMP_MARK = ".tmp"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PNEUMOSCOPE_CACHE", Path.home() / ".cache" / "pneumoscope"))


def max_cache_bytes() -> int:
    """The cache folder's bound from ``PNEUMOSCOPE_CACHE_MAX_GB`` (a bad value raises, naming it)."""
    text = os.environ.get(MAX_GB_ENV)
    try:
        gb = DEFAULT_MAX_GB if text in (None, "") else float(text)
    except ValueError:
        gb = float("nan")
    if not gb >= 0 or gb == float("inf"):
        raise ValueError(f"{MAX_GB_ENV} must be a number of gigabytes >= 0, got {text!r}")
    return int(gb * 1e9)


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


def _content_hash(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    except OSError:
        return "unreadable"


def _key(records: Sequence[ImageRecord], size: int, workers: int = 2) -> str:
    """The cache entry's name: decoder version, size, and every record's path and content hash."""
    # hashlib releases the GIL on large buffers: threads overlap the reads and the hashing.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = pool.map(_content_hash, [r.path for r in records])
        h = hashlib.sha256(f"v{DECODER_VERSION}:{size}".encode())
        for record, digest in zip(records, digests, strict=True):
            h.update(os.fsencode(record.path) + f"\0{digest}\n".encode())
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
                _touch(array_path)
                return SplitData(images, kept, tuple(tuple(f) for f in index["failures"]))
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable cache %s; rebuilding", array_path)
    result = decode_images(records, size, desc=desc)
    # Per-process names: DDP ranks may build the same cache at the same time.
    tmp_array = cache_dir / f"{key}.{os.getpid()}{_TMP_MARK}.npy"
    tmp_index = cache_dir / f"{key}.{os.getpid()}{_TMP_MARK}.json"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Temporary names, then rename: an interrupted run never leaves a torn entry.
        np.save(tmp_array, result.images)
        tmp_index.write_text(json.dumps({
            "kept": [r.path for r in result.records], "failures": result.failures, "size": size,
        }))
        os.replace(tmp_array, array_path)
        os.replace(tmp_index, index_path)
        images = np.load(array_path, mmap_mode="r")
    except OSError as exc:
        log.warning("could not write image cache in %s (%s); continuing without it", cache_dir, exc)
        return result
    finally:  # nothing half-written stays behind, whatever stopped us (disk full, Ctrl+C)
        tmp_array.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
    prune_cache(cache_dir, max_cache_bytes(), keep=key)
    return SplitData(images, result.records, result.failures)


def _touch(path: Path) -> None:
    """Mark an entry used (its mtime is the LRU clock); a read-only cache is still usable."""
    with contextlib.suppress(OSError):
        os.utime(path)


def prune_cache(cache_dir: str | Path, max_bytes: int, *, keep: str | None = None) -> list[str]:
    """Remove least recently used entries (``KEY.npy`` + ``KEY.json``) until the folder holds at
    most ``max_bytes``, never the entry ``keep``; also temporaries older than
    :data:`STALE_TMP_SECONDS` (a killed run's). Returns the keys removed."""
    cache_dir = Path(cache_dir)
    now = time.time()
    entries: list[tuple[float, int, str]] = []
    try:
        paths = list(cache_dir.iterdir())
    except OSError:
        return []
    for path in paths:
        try:
            st = path.stat()
        except OSError:  # removed meanwhile by another process
            continue
        if _TMP_MARK in path.name:
            if now - st.st_mtime > STALE_TMP_SECONDS:
                path.unlink(missing_ok=True)
            continue
        if path.suffix == ".npy":
            index = path.with_suffix(".json")
            index_size = index.stat().st_size if index.is_file() else 0
            entries.append((st.st_mtime, st.st_size + index_size, path.stem))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, key in sorted(entries):  # oldest use first
        if total <= max_bytes:
            break
        if key == keep:
            continue
        (cache_dir / f"{key}.npy").unlink(missing_ok=True)
        (cache_dir / f"{key}.json").unlink(missing_ok=True)
        total -= size
        removed.append(key)
    if removed:
        log.info("image cache %s: removed %d least recently used entr%s to stay under %.3g GB",
                 cache_dir, len(removed), "y" if len(removed) == 1 else "ies", max_bytes / 1e9)
    return removed
