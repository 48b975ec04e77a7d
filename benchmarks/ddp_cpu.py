"""DDP on the CPU (#14): the same one-epoch run as 1 process and as 2 DDP processes (gloo), on a
small real subset, with the wall time of each and a check that every number in ``metrics.json``
equals a single-process evaluation of the saved weights on exactly the N images of each split.

    python benchmarks/ddp_cpu.py --data ../shared/data/chest_xray [--per-class 150 --test-per-class 50]

The subset is copied into a temporary folder (never committed). Both runs go through the CLI
(`python -m pneumoscope train ...`), because Lightning's ``ddp`` starts the same command again
for the second process. The decoded-image cache is filled once beforehand, so both runs time
training and finalizing, not JPEG decoding. On a 2-core machine this is a correctness check,
not a speed-up: two processes share the cores one process already used. Writes
``benchmarks/results/ddp-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions
from ledger import record_file

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ["--model", "resnet18", "--weights", "none", "--epochs", "1", "--image-size", "64",
            "--accelerator", "cpu", "--precision", "32-true", "--set", "eval.fit_gate=false",
            "--set", "eval.stress_test=false", "--set", "eval.n_bootstrap=0",
            "--set", "tracking.enabled=false"]


def copy_subset(src: Path, dest: Path, per_class: int, test_per_class: int) -> Path:
    """Every k-th file (sorted names) of train/ and test/ per class: a spread of patients."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        for label in ("NORMAL", "PNEUMONIA"):
            files = sorted((src / split / label).iterdir())
            step = max(1, len(files) // n)
            (dest / split / label).mkdir(parents=True)
            for f in files[::step][:n]:
                shutil.copy2(f, dest / split / label / f.name)
    return dest


def run(data: Path, out: Path, devices: int, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "pneumoscope", "train", "--data", str(data), "--out", str(out),
               "--devices", str(devices), *(["--strategy", "ddp"] if devices > 1 else []), *SETTINGS]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return {"command": shlex.join(command), "wall_s": round(wall, 1), "run_dir": out / "resnet18-seed42",
            "reports": done.stdout.count("run folder:")}


def check(run_dir: Path, data: Path, threads: int) -> dict:
    """metrics.json against a single-process evaluation of the saved model file, with the thread
    count of the process that finalized the run (a different count changes the probabilities in
    the last bits, and the threshold sits on a validation probability, so a film can flip)."""
    import torch

    torch.set_num_threads(threads)
    from pneumoscope.data.cache import cached_images
    from pneumoscope.data.records import read_records
    from pneumoscope.evaluation.evaluate import evaluate_checkpoint
    from pneumoscope.evaluation.inference import predict_proba
    from pneumoscope.evaluation.metrics import binary_metrics
    from pneumoscope.models.checkpoint import load_checkpoint

    summary = json.loads((run_dir / "metrics.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        test = evaluate_checkpoint(run_dir / "model.safetensors", data, tmp, split="test",
                                   n_bootstrap=0, gate=False)
    model, info = load_checkpoint(run_dir / "model.safetensors")
    val_records = read_records(run_dir / "splits" / "val.csv")
    val = cached_images(val_records, info.preprocessing.image_size)
    val_metrics = binary_metrics(val.labels, predict_proba(model, val.images), info.threshold)
    with open(run_dir / "epochs.csv") as fh:
        (epoch,) = list(csv.DictReader(fh))
    return {
        "n": {"val": summary["val"]["n"], "val_records": len(val_records), "test": summary["test"]["n"],
              "test_single_process": test["n"]},
        "test_metrics_max_abs_diff": _max_diff(test["at_threshold"]["metrics"],
                                               summary["test"]["at_threshold"]["metrics"]),
        "val_metrics_max_abs_diff": _max_diff(val_metrics, summary["val"]["at_threshold"]["metrics"]),
        "val_loss_during_training": float(epoch["val_loss"]),
        "val_loss_single_process": val_metrics["log_loss"],
        "val_loss_abs_diff": abs(float(epoch["val_loss"]) - val_metrics["log_loss"]),
        "threshold": summary["threshold"], "test_auc": summary["test"]["at_threshold"]["metrics"]["auc"],
        "run_wall_time_s": summary["wall_time_s"], "checker_threads": threads,
    }


def _max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the metrics both report (same keys required; a
    metric that is undefined, e.g. NPV with no negative calls, must be undefined in both)."""
    if a.keys() != b.keys() or any((a[k] is None) != (b[k] is None) for k in a):
        return float("inf")
    return max(abs(a[k] - b[k]) for k in a if a[k] is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/chest_xray")
    parser.add_argument("--per-class", type=int, default=150, help="train-pool images per class")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild ddp-cpu.md from the saved ddp-cpu.json (no runs)")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "ddp-cpu.json").read_text()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PNEUMOSCOPE_CACHE"] = os.environ["PNEUMOSCOPE_CACHE"] = str(tmp / "cache")
        data = copy_subset(Path(args.data), tmp / "subset", args.per_class, args.test_per_class)

        from pneumoscope.config import load_config
        from pneumoscope.data.datasets import load_splits

        load_splits(load_config(dotted=[f"data.root={data}", "data.image_size=64"]).data, 42)  # cache
        runs = {}
        cores = len(os.sched_getaffinity(0))
        for name, devices in (("1 process", 1), ("DDP, 2 processes", 2)):
            result = run(data, tmp / name.replace(" ", "").replace(",", "-"), devices, env)
            # Lightning gives each DDP process cores // devices threads (OMP_NUM_THREADS unset).
            result["check"] = check(result.pop("run_dir"), data, max(1, cores // devices))
            runs[name] = result
    record = {"benchmark": "ddp-cpu", "command": shlex.join([sys.executable, *sys.argv]),
              "subset": {"train_pool_per_class": args.per_class, "test_per_class": args.test_per_class},
              "settings": SETTINGS, "runs": runs, "hardware": hardware(), "versions": versions()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp-cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    record_file(RESULTS / "ddp-cpu.json")  # it scores copied test films: a ledger row
    render(record)


def render(record: dict) -> None:
    """``ddp-cpu.md`` from the record (``--render-only`` rebuilds it from the saved JSON)."""
    hw, subset, runs = record["hardware"], record["subset"], record["runs"]
    lines = [
        "# ddp-cpu", "", f"Command: `{record['command']}`  ",
        f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores (load average "
        f"{hw['load_average_1m']} at the end; other jobs shared the machine)  ",
        f"Data: {2 * subset['train_pool_per_class']} train-pool images (val carved from them, "
        f"patient-grouped) and {2 * subset['test_per_class']} test images copied from the Kermany "
        "release; resnet18, random init, 64 px, 1 epoch, fp32, batch 32 per process.", "",
        "| run | wall s (command) | run s (metrics.json) | val n | test n | metrics.json vs single-process "
        "evaluation (val / test) | val loss in training vs single process | threshold | test AUC |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        c = r["check"]
        lines.append(f"| {name} | {r['wall_s']} | {c['run_wall_time_s']} | {c['n']['val']} | "
                     f"{c['n']['test']} | max diff {c['val_metrics_max_abs_diff']:.1e} / "
                     f"{c['test_metrics_max_abs_diff']:.1e} | "
                     f"diff {c['val_loss_abs_diff']:.1e} | {c['threshold']:.3f} | {c['test_auc']:.3f} |")
    lines += ["", "Differences of 1e-9 and below are float rounding (other batch sizes and thread "
              "counts in the check); the same films are scored, the same calls made. The two runs "
              "train differently by design (DDP: 2 x 32 images per optimiser step, half the steps, "
              "per-process augmentation), so their thresholds and AUCs differ; what must hold is "
              "that each run's metrics equal a single-process evaluation of its own saved weights "
              "on exactly the N images of each split. On 2 cores DDP is a correctness check, not a "
              "speed-up: the two processes split the cores one process already used (Lightning "
              "gives each 1 thread) and pay a second start-up and a gradient all-reduce per step. "
              "The wall times were taken while other jobs loaded the machine (load average above), "
              "so they bound the cost; they do not compare speed."]
    (RESULTS / "ddp-cpu.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "ddp-cpu.md").read_text())


if __name__ == "__main__":
    main()
