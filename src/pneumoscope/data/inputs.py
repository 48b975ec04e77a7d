"""What the user named on a command line (files, folders, glob patterns) → the image files to
read: the one input collector of ``predict``, ``explain`` and every other command that takes
images.

Every path is accounted for (:func:`scan_inputs`):

- a path the user named (or a glob matched) is always an :class:`InputEntry`: the file to
  read, or an ``error`` (missing, broken link, link loop, unreadable, a FIFO or device — never
  opened: opening a FIFO blocks) that becomes an error row;
- inside a folder, an entry whose name ends in an image suffix is treated the same way; anything
  else (another suffix, a hidden name, a broken link or FIFO without an image suffix, a folder
  already scanned through a link) is a counted, named skip: one log line per path and one
  summary line.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pneumoscope.data.decode import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputEntry:
    """One input: ``path`` to read, or ``error`` (why it cannot be read; it is never opened)."""

    path: Path
    error: str | None = None


@dataclass(frozen=True)
class InputScan:
    """The result of :func:`scan_inputs`: ``entries`` (sorted by path, no duplicates) get a row
    each; ``skipped`` are the folder entries that are not images, with the reason."""

    entries: list[InputEntry]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """The readable entries."""
        return [e.path for e in self.entries if e.error is None]

    def skip_counts(self) -> dict[str, int]:
        """Skips per kind (the reason up to its detail in brackets)."""
        return dict(Counter(reason.split(" (")[0] for _, reason in self.skipped))


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _problem(path: Path) -> tuple[os.stat_result | None, str | None]:
    """``(stat of the target, None)`` for something that exists, else ``(None, why not)``. Only
    ``stat``: nothing is opened."""
    try:
        return path.stat(), None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "symbolic link loop"
        if path.is_symlink():
            return None, f"broken symbolic link (to {os.readlink(path)})"
        if exc.errno == errno.ENOENT:
            return None, "input not found"
        return None, f"cannot read ({exc.strerror or exc})"


def _file_error(path: Path, st: os.stat_result) -> str | None:
    """Why a path that exists cannot be read as a file, or None."""
    if not stat.S_ISREG(st.st_mode):
        return f"{_kind(st.st_mode)}, not an image file (not opened)"
    if not os.access(path, os.R_OK):
        return "cannot read (permission denied)"
    return None


def file_entry(path: str | Path) -> InputEntry:
    """One path as an entry, checked with ``stat`` only (a FIFO or device is never opened; a
    folder is an error here: :func:`scan_inputs` expands folders)."""
    path = Path(path)
    st, why = _problem(path)
    if st is None:
        return InputEntry(path, why)
    if stat.S_ISDIR(st.st_mode):
        return InputEntry(path, "a folder, not an image file")
    return InputEntry(path, _file_error(path, st))


def _walk(folder: Path, seen_dirs: set[tuple[int, int]],
          skipped: list[tuple[Path, str]]) -> Iterator[InputEntry]:
    """Image entries under ``folder`` (recursive, links followed once), in name order."""
    try:
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield InputEntry(folder, f"cannot list folder ({exc.strerror or exc})")
        return
    for child in children:
        path = Path(child.path)
        looks_like_image = path.suffix.lower() in IMAGE_SUFFIXES
        if child.name.startswith("."):
            # macOS "._x.png" resource forks, .git, .cache: not images.
            skipped.append((path, "hidden"))
            continue
        st, why = _problem(path)
        if st is None:
            assert why is not None
            if looks_like_image:
                yield InputEntry(path, why)
            else:
                skipped.append((path, why))
        elif stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:  # a link back up the tree, or a second link to a folder
                skipped.append((path, "folder already scanned (symbolic link)"))
                continue
            seen_dirs.add(key)
            inside = list(_walk(path, seen_dirs, skipped))
            if not inside:  # an empty folder (or one named like an image) is a named skip too
                skipped.append((path, "folder with no image files"))
            yield from inside
        elif not looks_like_image:
            skipped.append((path, "unknown suffix" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)))
        else:
            yield InputEntry(path, _file_error(path, st))


def _named(path: Path, seen_dirs: set[tuple[int, int]],
           skipped: list[tuple[Path, str]]) -> list[InputEntry]:
    """A path the user named (or a glob matched): always at least one entry."""
    st, why = _problem(path)
    if st is None:
        return [InputEntry(path, why)]
    if stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            return []
        seen_dirs.add(key)
        found = list(_walk(path, seen_dirs, skipped))
        if not found:
            # Named, and no image in it: say so in a row (its skips are in the log).
            return [InputEntry(path, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")]
        return found
    # A file named explicitly is taken whatever its suffix (the decoder goes by content).
    return [file_entry(path)]


def scan_inputs(patterns: Sequence[str | Path]) -> InputScan:
    """Files, folders (searched recursively for image files, ``.dcm`` included) and glob patterns
    → every entry, sorted by path, without duplicates (the same file reached twice, through a
    link or two patterns, is kept once). A glob matching nothing is an entry with an error."""
    found: dict[Path, InputEntry] = {}
    skipped: list[tuple[Path, str]] = []
    seen_dirs: set[tuple[int, int]] = set()

    def add(entry: InputEntry) -> None:
        try:
            key = entry.path.resolve()
        except (OSError, RuntimeError):  # a link loop: resolve() raises on some Pythons
            key = entry.path.absolute()
        if key in found:
            skipped.append((entry.path, f"duplicate (same file as {found[key].path})"))
        else:
            found[key] = entry

    for pattern in patterns:
        text = str(pattern)
        path = Path(text)
        if _is_glob(text) and not os.path.lexists(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                add(InputEntry(path, "no files match this pattern"))
            for m in matches:
                for entry in _named(Path(m), seen_dirs, skipped):
                    add(entry)
        else:
            for entry in _named(path, seen_dirs, skipped):
                add(entry)
    scan = InputScan(sorted(found.values(), key=lambda e: str(e.path)), skipped)
    _log_scan(scan)
    return scan


def _log_scan(scan: InputScan) -> None:
    for path, reason in scan.skipped:
        benign = reason in ("hidden", "unknown suffix") or reason.startswith("duplicate")
        log.log(logging.INFO if benign else logging.WARNING, "skipped %s: %s", path, reason)
    errors = sum(e.error is not None for e in scan.entries)
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(scan.skip_counts().items()))
    log.info("inputs: %d image file(s), %d that cannot be read (one error row each), %d skipped%s",
             len(scan.entries) - errors, errors, len(scan.skipped), f" ({counts})" if counts else "")


def collect_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """The readable files of :func:`scan_inputs`; the first input that cannot be read raises
    (``FileNotFoundError`` for a missing one, ``ValueError`` otherwise), naming it."""
    scan = scan_inputs(patterns)
    for entry in scan.entries:
        if entry.error is not None:
            exc = FileNotFoundError if entry.error == "input not found" else ValueError
            raise exc(f"{entry.path}: {entry.error}")
    return scan.files


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (``--shard``) → ``(I, N)`` with ``0 <= I < N``; raises naming the bad value."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return i, n


def shard_of(path: str | Path, count: int) -> int:
    """The shard (``0 .. count-1``) of an input: a stable hash (BLAKE2b) of its path's bytes as
    written, modulo ``count``. It depends on the path alone, not on the rest of the list, so a
    file keeps its shard when files are added and N copies never overlap."""
    digest = hashlib.blake2b(os.fsencode(str(path)), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(entries: Sequence[InputEntry], index: int, count: int) -> list[InputEntry]:
    """The entries of shard ``index`` of ``count`` (order kept); the N shards partition the list."""
    return [e for e in entries if shard_of(e.path, count) == index]
