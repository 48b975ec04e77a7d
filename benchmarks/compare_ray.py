"""``compare --executor ray`` against the sequential ``compare`` on the same 2-model study.

    python benchmarks/compare_ray.py --data ../shared/data/chest_xray

Copies a small, fixed subset of the real data into a temporary folder (nothing is written
next to the data or committed), then runs the quick study (``configs/quick.yaml``: ImageNet
EfficientNet-Lite0 and a random-init ResNet-18 at 128 px) for one epoch three times, each in
its own study folder:

1. sequential: one model after another in this process (torch's default threads);
2. Ray, each trial given as many CPUs as the sequential run had threads: one trial at a time
   on a small machine; its leaderboard and probabilities must equal (1)'s bit for bit;
3. Ray, one CPU per trial: the trials run side by side; the speed case, whose numbers may
   differ from (1)'s in the last bits (fewer threads per trial sum in another order).

Wall time of each (Ray's start included: each Ray study starts its own local instance, as the
CLI does), the leaderboard check and the largest probability difference go to
``benchmarks/results/compare-ray-cpu.{json,md}``. On 2 cores this checks identity, not speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _env import hardware, versions
from ledger import record_file

from pneumoscope import pipeline
from pneumoscope.config import load_config
from pneumoscope.evaluation.leaderboard import leaderboard_markdown
from pneumoscope.pipeline import compare
from pneumoscope.ray_executor import RayExecutor
from pneumoscope.runs import RunLayout, read_predictions

RESULTS = Path(__file__).resolve().parent / "results"
# Images per split and class copied from the real data (the first ones by file name).
SUBSET = {("train", "NORMAL"): 150, ("train", "PNEUMONIA"): 250, ("val", "NORMAL"): 8,
          ("val", "PNEUMONIA"): 8, ("test", "NORMAL"): 60, ("test", "PNEUMONIA"): 90}


def copy_subset(data: Path, dest: Path) -> dict[str, int]:
    """The first images of each split/class folder of ``data`` (Kermany layout) into ``dest``."""
    counts = {}
    for (split, label), n in SUBSET.items():
        files = sorted((data / split / label).iterdir())[:n]
        (dest / split / label).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / split / label / f.name)
        counts[f"{split}/{label}"] = len(files)
    return counts


def comparable(board: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard without what differs between any two runs (folder, wall time)."""
    return {**board, "rows": [{k: v for k, v in r.items() if k not in ("run_dir", "wall_time_s")}
                              for r in board["rows"]]}


def max_prob_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    worst = 0.0
    for row_a in a["rows"]:
        row_b = next(r for r in b["rows"] if r["model"] == row_a["model"])
        pa = read_predictions(RunLayout(Path(row_a["run_dir"])).predictions("test")).probs
        pb = read_predictions(RunLayout(Path(row_b["run_dir"])).predictions("test")).probs
        worst = max(worst, float(np.max(np.abs(pa - pb))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the real data (Kermany layout)")
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--tag", default="compare-ray-cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="compare-ray-") as tmp:
        os.environ["PNEUMOSCOPE_CACHE"] = f"{tmp}/cache"  # the decoded subset goes with it
        root = Path(tmp) / "chest_xray"
        subset = copy_subset(Path(args.data), root)

        report_s: list[float] = []
        build_report = pipeline.write_report

        def timed_report(out: Path) -> dict[str, Path]:
            start = time.perf_counter()
            try:
                return build_report(out)
            finally:
                report_s.append(time.perf_counter() - start)

        # The report (Grad-CAM, faithfulness) is built from the run folders the same way after
        # either executor: timed apart, so the executors' share of the wall time is visible.
        pipeline.write_report = timed_report

        def study(name: str, executor: RayExecutor | None) -> dict[str, Any]:
            config = load_config(args.config, {"data": {"root": str(root)}, "out": f"{tmp}/{name}",
                                               "train": {"epochs": args.epochs}})
            start = time.perf_counter()
            result = compare(config, progress=False, executor=executor)
            wall = time.perf_counter() - start
            report = report_s.pop()
            cpus = executor.cpus_per_trial if executor else None
            at_once = 1 if cpus is None else max(1, int(len(os.sched_getaffinity(0)) // cpus))
            return {"wall_time_s": round(wall, 1), "report_s": round(report, 1),
                    "without_report_s": round(wall - report, 1), "board": result["leaderboard"],
                    "cpus_per_trial": cpus, "trials_at_once": at_once,
                    "trials": {o.model: o.status for o in result["outcomes"]},
                    "trial_wall_s": {r["model"]: r["wall_time_s"] for r in result["leaderboard"]["rows"]},
                    "config": config.to_dict()}

        runs = {"sequential": study("sequential", None),
                f"ray_{threads}cpu_per_trial": study("ray-same-threads", RayExecutor(cpus_per_trial=threads))}
        if threads > 1:
            runs["ray_1cpu_per_trial"] = study("ray-parallel", RayExecutor(cpus_per_trial=1))
        seq = runs["sequential"]["board"]
        for name, run in runs.items():
            if name != "sequential":
                run["leaderboard_identical_to_sequential"] = comparable(run["board"]) == comparable(seq)
                run["max_abs_prob_difference_vs_sequential"] = max_prob_difference(run["board"], seq)
    record = {"benchmark": args.tag, "command": shlex.join([sys.executable, *sys.argv]),
              "subset_images": subset, "sequential_torch_threads": threads,
              "hardware": hardware(), "versions": versions(),
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "board"} for k, v in runs.items()},
              "leaderboards": {k: v["board"] for k, v in runs.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    record_file(RESULTS / f"{args.tag}.json")  # it scores copied test films: a ledger row
    hw = record["hardware"]
    lines = [f"# {args.tag}", "", f"Command: `{record['command']}`  ",
             f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores, GPU: {hw['gpu'] or 'none'}, "
             f"load average at the end {hw['load_average_1m']}  ",
             f"Study: `{args.config}`, {args.epochs} epoch(s), on {sum(subset.values())} real images "
             f"({', '.join(f'{k} {v}' for k, v in subset.items())}); each study starts its own "
             "local Ray instance (its start is in the wall time). \"Without the report\": data loading "
             "(decoded once per study), the trials, the leaderboard.", "",
             "| executor | trials at once | wall time (s) | of which the report (s) | without the report (s) "
             "| each trial's run (s) | leaderboard = sequential | max abs Δ p(test) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        at_once = min(run["trials_at_once"], len(run["trial_wall_s"]))
        same = run.get("leaderboard_identical_to_sequential")
        diff = run.get("max_abs_prob_difference_vs_sequential")
        lines.append(f"| {name} | {at_once} | {run['wall_time_s']} | {run['report_s']} | "
                     f"{run['without_report_s']} | "
                     f"{', '.join(f'{m} {t}' for m, t in run['trial_wall_s'].items())} | "
                     f"{'—' if same is None else 'yes' if same else 'no'} | "
                     f"{'—' if diff is None else f'{diff:.3g}'} |")
    lines += ["", f"The sequential run trains with torch's {threads} thread(s). A Ray trial trains with "
              "as many threads as it has CPUs: the same leaderboard needs the same count (CPU kernels "
              "sum in an order that depends on it, and training amplifies the last bits)."]
    if hw["cpu_cores_available"] <= 2:
        lines += ["", f"On {hw['cpu_cores_available']} cores this checks identity, not speed: two 1-CPU "
                  "trials side by side do the same work as one 2-thread trial, plus Ray's start and a "
                  "worker process per trial."]
    lines += ["", "Wall times also move with whatever else runs on the machine (load average in the "
              "JSON): compare the rows for identity, and time on an otherwise idle machine."]
    lines += ["", "Sequential leaderboard:", "", leaderboard_markdown(seq)]
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
