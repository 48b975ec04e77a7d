"""Result files of batch prediction: written as rows are produced, resumable, never clobbered.

Formats, by the suffix of the output:

- ``.csv``: a header, then one line per row, appended and flushed (and fsync'ed) per batch;
- ``.jsonl`` (JSON Lines): one JSON object per line, appended the same way;
- ``.json``: a JSON array, written once at the end by temp file + rename. Until then rows go to
  ``.<name>.partial.jsonl`` beside it (appended per batch, so an interrupted run resumes too).

A ``kill -9`` loses at most the batch in flight; a torn last line is cut off on ``resume``.

Text is written as UTF-8 after :func:`safe_text`: a file name that is not valid UTF-8 keeps its
bytes as ``\\xNN`` escapes and control characters are escaped, so every row is one line and no
name can break the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pneumoscope.jsonio import json_safe

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = (".csv", ".jsonl", ".json")
"""Output suffixes :class:`ResultWriter` writes."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_text(text: str) -> str:
    """``text`` as it is written to a result file: bytes of a file name that are not UTF-8
    (Python holds them as lone surrogates, ``os.fsdecode``) become ``\\xNN``; other lone
    surrogates ``\\uXXXX``; control characters (newline, tab, ...) ``\\n``-style escapes."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that did not come from a file name's bytes
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def partial_path(out: Path) -> Path:
    """Where a ``.json`` output collects its rows until it is complete."""
    return out.with_name(f".{out.name}.partial.jsonl")


def check_output(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check an output path before any work starts; raises ``ValueError`` with one clear line:
    unknown suffix, a folder, a missing or unwritable folder, an unwritable file, or an existing
    result without ``resume`` (continue it) or ``overwrite`` (replace it)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a file in it, e.g. {out / 'results.csv'}")
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"--out must end in {', '.join(FORMATS)}, got {out}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: the folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in the folder {parent} (permission denied)")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the file is not writable (permission denied)")
    if not (resume or overwrite):
        if out.exists():
            raise ValueError(f"--out {out} already exists: --resume to continue it, --overwrite "
                             "to replace it")
        if out.suffix.lower() == ".json" and partial_path(out).exists():
            raise ValueError(f"--out {out}: an interrupted run left {partial_path(out)}: --resume to "
                             "continue it, --overwrite to start again")
    return out


def _cut_torn_tail(path: Path) -> None:
    """Drop an incomplete last line (a write cut by a kill): every row ends with a newline."""
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(pos, 1 << 16)
            fh.seek(pos - step)
            block = fh.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                pos = pos - step + i + 1
                break
            pos -= step
        log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                    path, size - pos)
        fh.truncate(pos)


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {n} is not JSON ({exc.msg}); not a result file "
                                     "of predict") from exc


class ResultWriter:
    """Appends rows (dicts with ``fields``) to ``out``; ``done`` holds the ``path`` of every row
    already there when ``resume``. Use as a context manager: a ``.json`` output is completed at
    a clean exit only, so an interrupted run leaves its rows in the partial file for ``resume``."""

    def __init__(self, out: str | Path, fields: Sequence[str], *, resume: bool = False) -> None:
        self.out = Path(out)
        self.fields = tuple(fields)
        self.format = self.out.suffix.lower()
        self.done: set[str] = set()
        self.first: dict[str, Any] | None = None
        """The first row already in the file (to check that a resumed file is the same job's)."""
        self._target = partial_path(self.out) if self.format == ".json" else self.out
        if resume:
            self._load_existing()
        else:
            self._target.unlink(missing_ok=True)
        new = not self._target.exists() or self._target.stat().st_size == 0
        self._fh: IO[str] = open(self._target, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if new and self.format == ".csv":
            self._fh.write(self._csv_line(dict(zip(self.fields, self.fields, strict=True))))
            self._sync()

    def _load_existing(self) -> None:
        if self.format == ".json" and not self._target.exists() and self.out.exists():
            # Resuming a complete array: its rows go first into the partial file.
            try:
                rows = json.loads(self.out.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{self.out} is not a JSON result file of predict ({exc})") from exc
            if not isinstance(rows, list):
                raise ValueError(f"{self.out} is not a JSON array of rows; not a result file of predict")
            with open(self._target, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        if not self._target.exists():
            return
        _cut_torn_tail(self._target)
        if self.format == ".csv":
            with open(self._target, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is not None and tuple(reader.fieldnames) != self.fields:
                    raise ValueError(f"{self._target} has the columns {','.join(reader.fieldnames)}, "
                                     f"not {','.join(self.fields)}: not a result file of predict")
                rows: Iterator[Mapping[str, Any]] = iter(reader)
                self._collect(rows)
        else:
            self._collect(_jsonl_rows(self._target))
        log.info("resuming %s: %d row(s) already there are skipped", self.out, len(self.done))

    def _collect(self, rows: Iterator[Mapping[str, Any]]) -> None:
        for row in rows:
            if "path" not in row:
                raise ValueError(f"{self._target}: a row without a 'path'; not a result file of predict")
            if self.first is None:
                self.first = dict(row)
            self.done.add(str(row["path"]))

    def _clean(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: safe_text(v) if isinstance(v, str) else v for k, v in json_safe(dict(row)).items()}

    def _csv_line(self, row: Mapping[str, Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf).writerow(["" if row.get(k) is None else row[k] for k in self.fields])
        return buf.getvalue()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` in one write, then flush and fsync: on disk before the next batch."""
        clean = [self._clean(r) for r in rows]
        if self.format == ".csv":
            text = "".join(self._csv_line(r) for r in clean)
        else:
            text = "".join(json.dumps({k: r.get(k) for k in self.fields}, ensure_ascii=False) + "\n"
                           for r in clean)
        self._fh.write(text)
        self._sync()
        self.done.update(r["path"] for r in clean)

    def close(self, complete: bool = True) -> None:
        """Close the file; a complete ``.json`` output is then written (temp file + rename)."""
        if self._fh.closed:
            return
        self._fh.close()
        if self.format == ".json" and complete:
            tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write("[")
                    for i, row in enumerate(_jsonl_rows(self._target)):
                        fh.write(("," if i else "") + "\n  " + json.dumps(row, ensure_ascii=False))
                    fh.write("\n]\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                tmp.replace(self.out)
            finally:
                tmp.unlink(missing_ok=True)
            self._target.unlink()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(complete=exc_type is None)


def safe_path(path: str | Path) -> str:
    """A path as result files and tables show it (see :func:`safe_text`)."""
    return safe_text(str(path))


__all__ = ["FORMATS", "ResultWriter", "check_output", "partial_path", "safe_path", "safe_text"]
