"""What a new local MLflow store costs: PneumoScope creates ``<out>/mlflow.db`` the first time a
run is tracked under ``--out``, through MLflow's public client (which builds the SQLite schema
by running its migrations), and reuses it for every later run there.

    python benchmarks/tracking_store.py [--repeats 3]

Each measurement runs in a fresh process (MLflow caches stores per process). Writes
``benchmarks/results/tracking-store-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = """
import json, sys, time
from pathlib import Path
from pneumoscope.config import load_config
from pneumoscope.tracking import track_run
out = Path(sys.argv[1])
config = load_config(dotted=[f"out={out}", "model.name=resnet18"])
times = []
for i in range(2):  # the first run creates the store, the second reuses it
    t = time.perf_counter()
    with track_run(config, out / f"run{i}") as tracker:
        assert tracker.active
    times.append(time.perf_counter() - t)
print(json.dumps({"new_store_s": times[0], "existing_store_s": times[1]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, "-c", _CHILD, out], capture_output=True, text=True,
                                  check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    record = {"benchmark": "tracking-store-cpu", "command": shlex.join([sys.executable, *sys.argv]),
              "runs": runs, "hardware": hardware(), "versions": versions(),
              "median_new_store_s": statistics.median(r["new_store_s"] for r in runs),
              "median_existing_store_s": statistics.median(r["existing_store_s"] for r in runs)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracking-store-cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    hw = record["hardware"]
    (RESULTS / "tracking-store-cpu.md").write_text(
        f"# tracking-store-cpu\n\nCommand: `{record['command']}`  \nHardware: {hw['cpu']}, "
        f"{hw['cpu_cores_available']} cores (load average {hw['load_average_1m']} at the end)\n\n"
        f"Opening a tracked run (MLflow's public client, local SQLite store), median of "
        f"{len(runs)} fresh processes: **{record['median_new_store_s']:.1f} s** when the run creates "
        f"`<out>/mlflow.db`, **{record['median_existing_store_s']:.2f} s** when the store exists.\n")
    print((RESULTS / "tracking-store-cpu.md").read_text())


if __name__ == "__main__":
    main()
