"""What the user named on a command line (files, folders, glob patterns) → the image files to
read: the one input collector of ``predict``, ``explain`` and every other command that takes
images."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from pneumoscope.data.decode import IMAGE_SUFFIXES


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _images_under(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS "._x.png" resource forks are not images.
    return [p for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")]


def collect_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Files, folders (searched recursively for image files, ``.dcm`` included) and glob
    patterns → a sorted list without duplicates. A file named explicitly is taken whatever
    its suffix (the decoder goes by content). A missing path or a pattern/folder matching
    nothing raises, naming it."""
    found: dict[Path, Path] = {}

    def add(path: Path) -> None:
        found.setdefault(path.resolve(), path)

    for pattern in patterns:
        text = str(pattern)
        path = Path(text)
        if path.is_file():
            add(path)
        elif path.is_dir():
            images = _images_under(path)
            if not images:
                raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
            for p in images:
                add(p)
        elif _is_glob(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            files = [m for m in matches if m.is_file()]
            files += [p for m in matches if m.is_dir() for p in _images_under(m)]
            if not files:
                raise ValueError(f"no files match {text}")
            for p in files:
                add(p)
        else:
            raise FileNotFoundError(f"input not found: {text}")
    return sorted(found.values(), key=str)
