"""The README's quick study on real data, with wall time and hardware saved beside it.

    python benchmarks/quick_compare.py --data ../shared/data/chest_xray

Runs ``pneumoscope compare --config configs/quick.yaml`` through the library and writes
``benchmarks/results/quick-compare-cpu.{json,md}``. The same script runs the seed study on a GPU
(``--config configs/seed-study-gpu.yaml --tag seed-study-gpu --parallel``); ``--from-runs DIR``
only summarises a study folder that another machine wrote, finished runs or not (what a GPU run
cut off by its time limit still measured: epochs done, seconds per epoch, validation AUC, and
the test metrics of the runs that finished). Each model scored on the test split gets a row in
the test-split ledger (``benchmarks/ledger.py``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions
from ledger import record_file

from pneumoscope.config import RunConfig, load_config
from pneumoscope.data.datasets import load_splits
from pneumoscope.pipeline import compare
from pneumoscope.runs import RunLayout, read_summary

RESULTS = Path(__file__).resolve().parent / "results"


def _runs_table(runs: list[dict]) -> str:
    """Per-run cost: wall time (training, evaluation, model file) and epochs."""
    lines = ["| model | wall time (s) | epochs | best checkpoint | best val AUC | precision |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['wall_time_s']:.0f} | {r['epochs_run']} | {r['best_epoch_checkpoint']} "
              f"| {r['best_val_auc']:.4f} | {r['precision']} |" for r in runs]
    return "\n".join(lines) + "\n"


def _train_in_parallel(config: RunConfig, args: argparse.Namespace, study: Path) -> None:
    """One ``pneumoscope train`` process per model of the study, all at once: a GPU that one
    batch-32 run leaves mostly idle (kernel launches dominate) then serves them side by side.
    Each run is the run :func:`compare` would make (same config, split and seed); ``compare``
    with ``resume`` then finds them finished and builds the leaderboard and report."""
    study.mkdir(parents=True, exist_ok=True)
    load_splits(config.data, config.train.seed)  # fill the decoded-image cache once, not N times at once
    sources = config.compare.sources(config.model.weights)
    procs = {}
    for name in config.compare.models:
        cmd = [sys.executable, "-m", "pneumoscope", "train", "--config", args.config, "--data", args.data,
               "--out", str(study), "--name", name, "--set", f"model.name={name}",
               "--set", f"model.weights={sources[name]}",
               *[item for text in args.set for item in ("--set", text)]]
        with open(study / f"{name}.log", "w") as log_file:
            procs[name] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        if proc.wait() != 0:
            logging.warning("%s failed (exit %d): see %s", name, proc.returncode, study / f"{name}.log")


def _progress(study: Path, models: tuple[str, ...]) -> list[dict]:
    """Per model of a study folder: epochs done, seconds per epoch (median gap between the
    epoch rows' end times), best validation AUC, and the test metrics where the run finished."""
    rows = []
    for name in models:
        layout = RunLayout(study / name)
        with open(layout.epochs, newline="") as fh:
            epochs = list(csv.DictReader(fh))
        ends = [datetime.fromisoformat(r["time"]) for r in epochs]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ends)]
        best = max(epochs, key=lambda r: float(r["val_auc"]))
        row = {"model": name, "epochs_done": len(epochs),
               "s_per_epoch_median": statistics.median(gaps) if gaps else None,
               "best_val_auc": float(best["val_auc"]), "best_epoch": int(best["epoch"]),
               "finished": layout.metrics.is_file(), "test": None}
        if row["finished"]:  # metrics.json is written last (the model file is not copied back)
            summary = read_summary(layout.root)
            point = summary.split("test").at_threshold
            row["test"] = {k: point.metrics[k] for k in ("auc", "accuracy", "sensitivity", "specificity")}
            row["test"]["threshold"] = summary.threshold
            row["wall_time_s"] = summary.wall_time_s
        rows.append(row)
    return rows


def _summarise(args: argparse.Namespace, config: RunConfig) -> None:
    study = Path(args.from_runs)
    rows = _progress(study, config.compare.models)
    device = (study / "device.txt").read_text() if (study / "device.txt").is_file() else ""
    record = {"benchmark": args.tag, "command": shlex.join([sys.executable, *sys.argv]),
              "config": config.to_dict(), "note": args.note, "device": device, "runs": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    record_file(args.results / f"{args.tag}.json", kind="from-runs")
    lines = [f"# {args.tag}", "", f"Command: `{record['command']}`", "", args.note, "",
             "Device (as the run reported it):", "", "```", device.strip(), "```", "",
             "| model | epochs done | s/epoch (median) | best val AUC (epoch) | finished | test AUC "
             "| accuracy | sensitivity | specificity | threshold |", "|---" * 10 + "|"]
    for r in rows:
        t = r["test"] or {}
        cells = [f"{t[k]:.3f}" if k in t else "" for k in
                 ("auc", "accuracy", "sensitivity", "specificity", "threshold")]
        lines.append(f"| {r['model']} | {r['epochs_done']} | {r['s_per_epoch_median'] or 0:.1f} | "
                     f"{r['best_val_auc']:.4f} ({r['best_epoch']}) | {'yes' if r['finished'] else 'no'} | "
                     + " | ".join(cells) + " |")
    (args.results / f"{args.tag}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="data folder (needed unless --from-runs)")
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--tag", default="quick-compare-cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.epochs=1 (a smoke run of a GPU config)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the result files go (default benchmarks/results)")
    parser.add_argument("--parallel", action="store_true",
                        help="train the study's models in parallel processes (one GPU shared), then "
                        "build the leaderboard")
    parser.add_argument("--from-runs", metavar="STUDY_DIR",
                        help="train nothing: summarise this study folder (finished runs or not)")
    parser.add_argument("--note", default="", help="with --from-runs: what the reader must know")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete this benchmark's earlier study folder first (a timing rerun)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, {"data": {"root": args.data}, "out": args.out}, args.set)
    if args.from_runs:
        _summarise(args, config)
        return
    if not args.data:
        parser.error("--data is required")
    study = Path(config.out) / (config.name or "compare")  # where compare() writes
    if args.overwrite and study.is_dir():
        shutil.rmtree(study)
    start = time.perf_counter()
    if args.parallel:
        _train_in_parallel(config, args, study)
    result = compare(config, resume=args.parallel, progress=False)
    wall = time.perf_counter() - start
    board = result["leaderboard"]
    runs = []
    for name in config.compare.models or (config.model.name,):
        summary = read_summary(study / name)
        runs.append({"model": name, "wall_time_s": summary.wall_time_s, "epochs_run": summary.epochs_run,
                     "best_epoch_checkpoint": summary.best_epoch_checkpoint,
                     "best_val_auc": summary.best_val_auc_during_training,
                     "precision": summary.precision})
    record = {"benchmark": args.tag, "command": shlex.join([sys.executable, *sys.argv]),
              "config": config.to_dict(), "wall_time_s": round(wall, 1),
              "runs_in_parallel": args.parallel,
              "hardware": hardware(), "versions": versions(), "runs": runs, "leaderboard": board}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    record_file(args.results / f"{args.tag}.json", kind="evaluated")
    md = result["paths"]["md"].read_text()
    hw = record["hardware"]
    (args.results / f"{args.tag}.md").write_text(
        f"# {args.tag}\n\nCommand: `{record['command']}`  \nHardware: {hw['cpu']}, "
        f"{hw['cpu_cores_available']} cores, GPU: {hw['gpu'] or 'none'}  \n"
        f"Wall time (all models, data loading, report): {wall / 60:.1f} min"
        f"{' (models trained side by side, one process each)' if args.parallel else ''}\n\n"
        f"{md}\n\n{_runs_table(runs)}")
    print(md)


if __name__ == "__main__":
    main()
