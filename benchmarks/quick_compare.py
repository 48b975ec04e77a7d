"""The README's quick study on real data, with wall time and hardware saved beside it.

    python benchmarks/quick_compare.py --data ../shared/data/chest_xray

Runs ``pneumoscope compare --config configs/quick.yaml`` through the library and writes
``benchmarks/results/quick-compare-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions

from pneumoscope.config import load_config
from pneumoscope.pipeline import compare

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--tag", default="quick-compare-cpu")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete this benchmark's earlier study folder first (a timing rerun)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, {"data": {"root": args.data}, "out": args.out})
    study = Path(config.out) / (config.name or "compare")  # where compare() writes
    if args.overwrite and study.is_dir():
        shutil.rmtree(study)
    start = time.perf_counter()
    result = compare(config, progress=False)
    wall = time.perf_counter() - start
    board = result["leaderboard"]
    record = {"benchmark": args.tag, "command": shlex.join([sys.executable, *sys.argv]),
              "config": config.to_dict(), "wall_time_s": round(wall, 1),
              "hardware": hardware(), "versions": versions(), "leaderboard": board}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    md = result["paths"]["md"].read_text()
    hw = record["hardware"]
    (RESULTS / f"{args.tag}.md").write_text(
        f"# {args.tag}\n\nCommand: `{record['command']}`  \nHardware: {hw['cpu']}, "
        f"{hw['cpu_cores_available']} cores, GPU: {hw['gpu'] or 'none'}  \n"
        f"Wall time (all models, data loading, report): {wall / 60:.1f} min\n\n{md}")
    print(md)


if __name__ == "__main__":
    main()
