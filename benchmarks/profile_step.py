"""Where one PneumoScope training step spends its time (torch profiler), per operator.

    python benchmarks/profile_step.py --models densenet121,resnetv2_50

Builds each model as ``pneumoscope train`` does on this machine (channels_last; bf16 autocast
where ``train.precision=auto`` picks it), runs warm-up steps, then profiles a few steps of
augmentation + forward + backward + AdamW at 224 px, batch 32, and writes the operators with the
most self CPU time, plus the share of each operator family, to
``benchmarks/results/profile-train-step-cpu.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions
from _steps import training_step

from pneumoscope.training.train import resolve_precision

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {  # operator-name fragments → family, first match wins
    "convolution": ("conv", "mkldnn_convolution"),
    "batch norm": ("batch_norm", "native_batch_norm"),
    "concatenation / copies": ("cat", "copy_", "contiguous", "to_copy", "clone"),
    "matmul / linear": ("addmm", "mm", "linear"),
    "pooling": ("pool",),
    "activation": ("relu", "silu", "gelu", "sigmoid", "threshold"),
    "optimizer": ("adamw", "_foreach", "lerp", "addcdiv", "sqrt"),
    "augmentation": ("grid_sampler", "affine_grid"),
}


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES.items():
        if any(k in low for k in keys):
            return fam
    return "other"


def profile_model(name: str, size: int, batch: int, steps: int) -> dict[str, Any]:
    precision = resolve_precision("auto", "cpu", name)
    step = training_step(name, size, batch, bf16=precision == "bf16-mixed")

    for _ in range(2):
        step()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    families: dict[str, float] = {}
    for e in events:
        families[family(e.key)] = families.get(family(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"model": name, "precision": precision, "image_size": size, "batch_size": batch,
            "steps": steps, "step_s": wall / steps,
            "family_share": {k: v / total for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_share": e.self_cpu_time_total / total}
                        for e in top]}


def to_markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = ["# Where a training step's time goes (torch profiler, self CPU time)", "",
             f"Command: `{result['command']}`  ",
             f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores, GPU: {hw['gpu'] or 'none'}", ""]
    for r in result["models"]:
        lines += [f"## {r['model']} ({r['precision']}, {r['image_size']} px, batch {r['batch_size']}, "
                  f"{r['step_s']:.2f} s a step while profiled)", "",
                  "| operator family | share |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in r["family_share"].items()]
        lines += ["", "| operator | calls | share |", "|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {100 * o['self_cpu_share']:.1f}% |" for o in r["top_ops"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if "MALLOC_MMAP_MAX_" not in os.environ:
        # As the CLI does for itself: glibc reads these at process start only.
        from pneumoscope.runtime import FAST_MALLOC_ENV

        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **FAST_MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="densenet121,resnetv2_50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "profile-train-step-cpu"))
    args = parser.parse_args()
    result = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "hardware": hardware(),
              "versions": versions(),
              "models": [profile_model(m, args.image_size, args.batch_size, args.steps)
                         for m in args.models.split(",")]}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result) + "\n")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
