"""The test-split ledger: one row each time a benchmark looks at the official Kermany test split.

    python benchmarks/ledger.py --backfill   # rows for the result files committed before the ledger
    python benchmarks/ledger.py --readme     # rebuild the README's ledger table from the CSV

Every benchmark that scores the official test split (accuracy.py, quick_compare.py, site.py,
and gate.py, whose refusal rates are split by the test labels) calls :func:`record_file` right
after writing its result file, which appends its rows to ``test-ledger.csv`` beside that file
(``benchmarks/results/test-ledger.csv`` by default). ``recipe_search.py`` drops the test split
before training and never scores it: it writes no row.

Columns: UTC time, git commit (``+dirty`` when tracked files differ from it), ``kind``
(``evaluated``: the command scored the test split; ``from-runs``: it read back test scores
that run folders hold, scored when those runs were trained; ``backfilled``: a result file
committed before the ledger existed, with that commit and date), benchmark, recipe, the
SHA-256 of the recipe's resolved config, seeds, the number of test films, the headline metrics
(AUC, accuracy, sensitivity, specificity; empty where the file has none), the result file and
a note. The config hash (:func:`recipe_sha256`) leaves out what names a run rather than what
it does (``out``, ``name``, data paths, the seed, which the ``seeds`` column holds, tracking
and the compare list), so every seed and every machine running a recipe gives the same hash.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pneumoscope.config import RunConfig, load_config, with_overrides
from pneumoscope.jsonio import write_text_atomic

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LEDGER_NAME = "test-ledger.csv"
FIELDS = ("time_utc", "git_commit", "kind", "benchmark", "recipe", "config_sha256", "seeds", "n_test",
          "auc", "accuracy", "sensitivity", "specificity", "result_file", "note")
HEADLINE = ("auc", "accuracy", "sensitivity", "specificity")
KINDS = ("evaluated", "from-runs", "backfilled")
BACKFILL_BASE = "f490c8bc6dd8f810ec4b58dcef2c5d1a3689113d"
"""The last commit before the ledger: backfilled rows describe the result files as they were
there, so rerunning ``--backfill`` after a result file changes gives the same rows."""
README_BEGIN = "<!-- test-ledger:begin (generated: python benchmarks/ledger.py --readme) -->"
README_END = "<!-- test-ledger:end -->"


@dataclass(frozen=True)
class TestRead:
    """What one result file says about one recipe scored on the test split."""

    benchmark: str
    recipe: str
    config_sha256: str
    seeds: tuple[int, ...]
    metrics: Mapping[str, Any] = field(default_factory=dict)
    n_test: int | None = None
    note: str = ""


ADDED_AT_DEFAULT: dict[tuple[str, str], Any] = {("data", "split_seed"): None, ("eval", "tta"): False}
"""Config fields added after the ledger began, left out of the hash at their default (which is
what every earlier recipe ran with), so an unchanged recipe keeps its hash."""


def recipe_sha256(config: RunConfig | Mapping[str, Any]) -> str:
    """SHA-256 of a recipe's resolved config (a mapping is resolved first: defaults filled in,
    old keys migrated), without the fields that name a run rather than define it."""
    resolved = config if isinstance(config, RunConfig) else load_config(overrides=config)
    d = resolved.to_dict()
    for key in ("out", "name", "tracking", "compare"):
        d.pop(key, None)
    for key in ("root", "download_dir", "cache_dir"):
        d["data"].pop(key, None)
    d["train"].pop("seed", None)
    for (section, key), default in ADDED_AT_DEFAULT.items():
        if d[section].get(key, default) == default:
            d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _run_name(checkpoint: str) -> str:
    """``runs/headline/lite0-texture-seed7/model.safetensors`` → ``lite0-texture-seed7``."""
    return Path(checkpoint.removeprefix("checkpoint ")).parent.name or checkpoint


def _accuracy_reads(record: Mapping[str, Any]) -> list[TestRead]:
    """accuracy.py: one recipe, several seeds, headline = the mean over seeds."""
    if "config_overrides" not in record or "Kermany" not in str(record.get("dataset", "")):
        return []
    seeds = record["seeds"]
    subtypes = seeds[0].get("by_subtype") or {}
    config = load_config(dotted=record["config_overrides"])
    return [TestRead("accuracy", record["recipe"], recipe_sha256(config),
                     tuple(int(s["seed"]) for s in seeds), record["metrics"],
                     sum(int(v["n"]) for v in subtypes.values()) or None,
                     "mean over seeds, each at its validation threshold")]


def _compare_reads(record: Mapping[str, Any]) -> list[TestRead]:
    """quick_compare.py: one row per model with test metrics (its leaderboard, or with
    ``--from-runs`` the runs that finished)."""
    if "config" not in record or not {"leaderboard", "runs"} & set(record):
        return []
    config = load_config(overrides=record["config"])
    sources = config.compare.sources(config.model.weights) if config.compare.models \
        else {config.model.name: config.model.weights}
    if "leaderboard" in record:
        rows = [(r["model"], r["metrics"]) for r in record["leaderboard"]["rows"]]
    else:
        rows = [(r["model"], r["test"]) for r in record["runs"] if r.get("test")]
    tag = record["benchmark"]
    return [TestRead(tag, f"{tag}/{model}",
                     recipe_sha256(with_overrides(config, model={"name": model, "weights": sources[model]})),
                     (config.train.seed,), metrics) for model, metrics in rows]


def _site_reads(record: Mapping[str, Any]) -> list[TestRead]:
    """site.py on the real test split: the frozen model's scores on all of it."""
    if "frozen_test" not in (record.get("result") or {}) \
            or "official test split" not in str(record.get("data", "")):
        return []
    model, result = record["model"], record["result"]
    return [TestRead(record["benchmark"], f"{record['benchmark']}/{_run_name(model['source'])}",
                     model.get("config_sha256", ""), (), result["frozen_test"], result["n_films"],
                     "frozen model on the whole split; site choices made on patient-grouped halves")]


def _gate_reads(record: Mapping[str, Any]) -> list[TestRead]:
    """gate.py: no classifier metric, but the test labels split its refusal rates by class."""
    if "kermany" not in record or "ood" not in record:
        return []
    return [TestRead(record["benchmark"], f"{record['benchmark']}/{_run_name(str(record.get('checkpoint')))}",
                     record.get("config_sha256", ""), (), {}, record["kermany"]["test"]["n"],
                     "input gate only: refusal rates on the test films, split by their labels")]


def _check_reads(record: Mapping[str, Any]) -> list[TestRead]:
    """ddp_cpu.py and compare_ray.py: engine checks on a few copied test films (the scores only
    have to equal another way of computing them; no recipe is reported or chosen from them)."""
    if "test_per_class" in (record.get("subset") or {}):  # ddp_cpu.py
        count = 2 * int(record["subset"]["test_per_class"])
    elif "subset_images" in record:  # compare_ray.py
        count = sum(int(v) for k, v in record["subset_images"].items() if k.startswith("test/"))
    else:
        return []
    return [TestRead(record["benchmark"], f"{record['benchmark']}/engine-check", "", (), {}, count,
                     "engine check on copied test films (equality with another computation; "
                     "no recipe reported or chosen)")]


READERS: tuple[Callable[[Mapping[str, Any]], list[TestRead]], ...] = (
    _accuracy_reads, _compare_reads, _site_reads, _gate_reads, _check_reads)
"""One per benchmark that reads the test split; each knows its benchmark's result files by
their fields (not by the file name, which ``--tag`` changes) and returns [] for any other."""


def test_reads(record: Mapping[str, Any]) -> list[TestRead]:
    """The test-split reads a benchmark result file records (none for most files)."""
    return [read for reader in READERS for read in reader(record)]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def current_commit() -> str:
    """HEAD, with ``+dirty`` when tracked files differ from it (results of uncommitted code)."""
    try:
        head = _git("rev-parse", "HEAD")
        return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.6f}"


def rows_for(reads: Iterable[TestRead], *, time_utc: str, commit: str, kind: str, result_file: str,
             note: str = "") -> list[dict[str, str]]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [{"time_utc": time_utc, "git_commit": commit, "kind": kind, "benchmark": r.benchmark,
             "recipe": r.recipe, "config_sha256": r.config_sha256,
             "seeds": ";".join(str(s) for s in r.seeds), "n_test": "" if r.n_test is None else str(r.n_test),
             **{m: _fmt(r.metrics.get(m)) for m in HEADLINE}, "result_file": result_file,
             "note": "; ".join(n for n in (r.note, note) if n)} for r in reads]


def read_ledger(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the ledger's {list(FIELDS)}")
        return list(reader)


def write_ledger(path: Path, rows: Sequence[Mapping[str, str]]) -> Path:
    lines = [",".join(FIELDS)]
    for row in rows:
        lines.append(_csv_line([row[f] for f in FIELDS]))
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _csv_line(values: Sequence[str]) -> str:
    from io import StringIO

    buf = StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def record_file(result_file: Path, *, kind: str = "evaluated", note: str = "",
                ledger: Path | None = None) -> list[dict[str, str]]:
    """Append a row per test-split read that ``result_file`` (just written) records, to
    ``ledger`` (default: ``test-ledger.csv`` beside the result file). Returns the rows."""
    record = json.loads(Path(result_file).read_text())
    rows = rows_for(test_reads(record), time_utc=datetime.now(UTC).isoformat(timespec="seconds"),
                    commit=current_commit(), kind=kind, result_file=_relative(Path(result_file)), note=note)
    if rows:
        path = ledger or Path(result_file).parent / LEDGER_NAME
        write_ledger(path, [*read_ledger(path), *rows])
        log.info("test-split ledger %s: %d row(s) for %s", path, len(rows), result_file)
    return rows


def backfill_rows(base: str = BACKFILL_BASE) -> list[dict[str, str]]:
    """Rows for the result files committed at ``base`` that record test-split reads, each with
    the commit and date that last changed the file (``git log -1 --format=%H,%cI base -- FILE``)."""
    rows = []
    for path in _git("ls-tree", "--name-only", base, "benchmarks/results/").splitlines():
        if not path.endswith(".json"):
            continue
        reads = test_reads(json.loads(_git("show", f"{base}:{path}")))
        if not reads:
            continue
        commit, date = _git("log", "-1", "--format=%H,%cI", base, "--", path).split(",")
        versions = len(_git("log", "--format=%H", base, "--", path).splitlines())
        note = (f"the file was committed in {versions} versions; earlier ones (git log -- {path}) "
                "were earlier reads or rebuilds from the same runs" if versions > 1 else "")
        rows += rows_for(reads, time_utc=datetime.fromisoformat(date).astimezone(UTC).isoformat(),
                         commit=commit, kind="backfilled", result_file=path, note=note)
    return sorted(rows, key=lambda r: r["time_utc"])


def backfill(ledger: Path, base: str = BACKFILL_BASE) -> list[dict[str, str]]:
    """Replace the ledger's backfilled rows by :func:`backfill_rows` (the other rows stay, after them)."""
    rows = backfill_rows(base)
    write_ledger(ledger, [*rows, *(r for r in read_ledger(ledger) if r["kind"] != "backfilled")])
    return rows


def readme_section(rows: Sequence[Mapping[str, str]], ledger: str) -> str:
    """The README's ledger paragraph and table: reads per recipe, with the latest numbers."""
    by_recipe: dict[str, list[Mapping[str, str]]] = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], []).append(row)
    kinds = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    scored = sum(len(r["seeds"].split(";")) if r["seeds"] else 1 for r in rows)
    text = (f"The official Kermany test split has been read by benchmarks in **{len(rows)} ledger "
            f"rows** for {len(by_recipe)} recipes ({kinds['backfilled']} backfilled from result files "
            f"committed before the ledger, {kinds['evaluated']} evaluated since, {kinds['from-runs']} "
            f"rebuilt from run folders); a row holds all seeds of a recipe ({scored} test scorings "
            f"counting each seed). Every row is in [`{ledger}`]({ledger}); the \"last\" columns are "
            "each recipe's latest row.")
    lines = [textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False), "",
             "| recipe | rows | seeds (last) | last read (UTC) | kind | config sha256 | AUC | accuracy "
             "| sensitivity | specificity |", "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe, group in by_recipe.items():
        last = max(group, key=lambda r: r["time_utc"])
        cells = [f"{float(last[m]):.3f}" if last[m] else "–" for m in HEADLINE]
        lines.append(f"| {recipe} | {len(group)} | {last['seeds'].replace(';', ', ') or '–'} | "
                     f"{last['time_utc'][:10]} | {last['kind']} | {last['config_sha256'][:12] or '–'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no ledger markers ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    write_text_atomic(readme, f"{head}{README_BEGIN}\n{section}{README_END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ledger", type=Path, default=RESULTS / LEDGER_NAME)
    parser.add_argument("--backfill", action="store_true",
                        help=f"(re)write the backfilled rows from the result files at {BACKFILL_BASE[:8]}")
    parser.add_argument("--record", type=Path, metavar="RESULT_JSON",
                        help="append the rows of a result file written by a benchmark run before it "
                        "called the ledger itself (say when it ran with --note)")
    parser.add_argument("--note", default="", help="with --record")
    parser.add_argument("--readme", nargs="?", const=REPO / "README.md", type=Path, metavar="README",
                        help="rebuild the ledger section of README.md (between its markers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.backfill:
        log.info("%d backfilled row(s) in %s", len(backfill(args.ledger)), args.ledger)
    if args.record:
        record_file(args.record, note=args.note, ledger=args.ledger)
    section = readme_section(read_ledger(args.ledger), _relative(args.ledger))
    if args.readme:
        update_readme(args.readme, section)
    sys.stdout.write(section)


if __name__ == "__main__":
    main()
