"""Process-level settings for running on this machine: how many cores, and the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

FAST_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
"""The same allocator settings as environment variables, for a child process (glibc reads them
at start-up); benchmarks start their measured workers with them."""

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def is_rank_zero() -> bool:
    """Whether this process is the first of a distributed run (or not distributed at all), from
    the launcher's environment: under DDP every process runs the whole command, and only this
    one writes the run folder and tracks it."""
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to reuse freed buffers instead of returning them to the OS: without
    it every large batch unmaps its tensors and page-faults them back on the next (measured in
    benchmarks/speed.py). The same as starting with ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=1e11``, set through ``mallopt`` so no restart is needed. Returns
    whether it took effect (False off glibc, or when the user set either variable)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_MAX_" in os.environ \
            or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 100_000_000_000) == 1
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    log.debug("malloc: freed buffers kept for reuse (%s)", "ok" if ok else "refused")
    return ok
