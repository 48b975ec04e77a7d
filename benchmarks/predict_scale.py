"""``pneumoscope predict`` over 10,000 files: throughput, peak RSS, and a kill -9 + --resume run.

    python benchmarks/predict_scale.py                      # 10,000 files, the saved result
    python benchmarks/predict_scale.py --files 500 --tag predict-scale-smoke

The films are copies of the shared Kermany JPEGs (224x224, ../shared/data/chest_xray; cycled
until ``--files``), written under a temporary folder that is deleted at the end (never
committed). The model is a **tiny resnet18 at 64 px**, random init then a few Adam steps on
synthetic phantoms: its probabilities mean nothing; the timings are those of the whole predict
path (scan, decode, resize, input gate's deterministic checks, model, CSV rows appended and
fsync'ed per batch). Each run is the console command in a subprocess; its peak RSS is the
process's ``VmHWM`` (Linux), sampled every 0.1 s with the rows written so far.

Runs: (1) all files, ``kill -9`` when about half the rows are written, then the same command
with ``--resume``: the file must end with exactly one row per film, no duplicates, one header;
(2) the first ``--compare-files`` with ``--decode-workers 0`` and with the default (same files);
their peak RSS against run (1)'s: bounded memory means about the same peak for 10x the files.
Writes ``benchmarks/results/<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "chest_xray"
PER_FOLDER = 1000

log = logging.getLogger("predict_scale")


def make_films(dest: Path, n: int, source: Path) -> list[Path]:
    """``n`` copies of the source JPEGs (cycled), 1,000 per sub-folder."""
    sources = sorted(source.rglob("*.jpeg"))
    if not sources:
        raise SystemExit(f"no .jpeg under {source}: see ../shared/data/README.md")
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        folder = dest / f"{i // PER_FOLDER:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}-{src.name}"
        shutil.copyfile(src, path)
        out.append(path)
    return out


def tiny_model(path: Path, steps: int = 30) -> dict[str, Any]:
    """A resnet18 at 64 px, a few Adam steps on synthetic phantoms (timing only)."""
    import numpy as np
    import torch

    from pneumoscope.data.datasets import to_model_input
    from pneumoscope.data.synthetic import make_phantom
    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("resnet18", "none", image_size=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        labels = rng.integers(0, 2, 16)
        x = to_model_input(np.stack([make_phantom(rng, 64, pneumonia=bool(y)) for y in labels]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(x).reshape(-1), torch.as_tensor(labels, dtype=torch.float32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing,
                          threshold_method="benchmark only (tiny model, synthetic training)")
    save_checkpoint(path, model, info)
    return {"model": "resnet18", "image_size": 64, "weights": "random init + "
            f"{steps} Adam steps (batch 16) on synthetic phantoms", "gate": "deterministic checks only "
            "(no fitted gate in the file)", "final_train_loss": round(float(loss), 4)}


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _complete_rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def run_predict(args: list[str], out: Path, *, kill_at_rows: int | None = None) -> dict[str, Any]:
    """One ``python -m pneumoscope predict`` in a subprocess, sampled every 0.1 s."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pneumoscope", "predict", *args, "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    captured: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: captured.__setitem__(k, s.read()), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    peak, first_row_at, samples, killed_at, last_sample = 0, None, [], None, 0.0
    while proc.poll() is None:
        now = time.perf_counter() - started
        peak = max(peak, _status(proc.pid).get("VmHWM", 0))
        if now - last_sample >= 1.0 or kill_at_rows is not None or first_row_at is None:
            rows = _complete_rows(out)
            if rows and first_row_at is None:
                first_row_at = now
            if now - last_sample >= 1.0:
                samples.append({"t_s": round(now, 1), "rows": rows,
                                "rss_mib": round(_status(proc.pid).get("VmRSS", 0) / 2**20, 1)})
                last_sample = now
            if kill_at_rows is not None and rows >= kill_at_rows:
                proc.send_signal(signal.SIGKILL)
                killed_at = rows
                break
        time.sleep(0.1)
    proc.wait()
    wall = time.perf_counter() - started
    for t in readers:
        t.join(timeout=10)
    rows = _complete_rows(out)
    shown = [Path(a).name if os.sep in a else a for a in args]  # no temporary paths in results
    result = {"command": " ".join(["pneumoscope", "predict", *shown, "--out", out.name]),
              "returncode": proc.returncode, "wall_s": round(wall, 1), "rows_in_file": rows,
              "peak_rss_mib": round(peak / 2**20, 1), "rss_samples": samples,
              "summary_line": (captured.get("stdout") or "").strip().splitlines()[-1:]}
    if first_row_at is not None:
        result["first_row_after_s"] = round(first_row_at, 1)
    if killed_at is not None:
        result["killed_at_rows"] = killed_at
    if proc.returncode not in (0, -signal.SIGKILL):
        result["stderr_tail"] = (captured.get("stderr") or "")[-2000:]
    return result


def _read_paths(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [r["path"] for r in csv.DictReader(fh)]


def _rate(n: int, run: dict[str, Any]) -> float | None:
    """Images per second from the first row to the end (model load and scan excluded)."""
    span = run["wall_s"] - run.get("first_row_after_s", 0.0)
    return round(n / span, 1) if span > 0 else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="pneumoscope-predict-scale-"))
    try:
        t0 = time.perf_counter()
        films = make_films(tmp / "films", args.files, Path(args.data))
        copy_s = time.perf_counter() - t0
        ckpt = tmp / "tiny-resnet18.safetensors"
        model = tiny_model(ckpt)
        expected = sorted(str(p) for p in films)
        common = [str(ckpt), str(tmp / "films"), "--batch-size", str(args.batch_size)]
        log.info("%d films copied in %.1f s; run 1: all files, kill -9 at about half, then --resume",
                 len(films), copy_s)
        out = tmp / "rows.csv"
        killed = run_predict(common, out, kill_at_rows=args.files // 2)
        killed["rows_complete_at_kill"] = at_kill = _complete_rows(out)
        killed["img_per_s"] = _rate(killed.get("killed_at_rows", at_kill), killed)
        resumed = run_predict([*common, "--resume"], out)
        resumed["summary_line"] = [line.replace(str(tmp), "<tmp>") for line in resumed["summary_line"]]
        resumed["img_per_s"] = _rate(args.files - at_kill, resumed)
        paths = _read_paths(out)
        header_lines = out.read_text(encoding="utf-8").count("path,prob_pneumonia")
        resume_check = {"rows": len(paths), "unique_paths": len(set(paths)),
                        "same_set_as_inputs": sorted(paths) == expected, "header_lines": header_lines,
                        "error_rows": 0, "passed": False}
        with out.open(newline="", encoding="utf-8") as fh:
            resume_check["error_rows"] = sum(bool(r["error"]) for r in csv.DictReader(fh))
        resume_check["passed"] = (len(paths) == len(set(paths)) == args.files
                                  and sorted(paths) == expected and header_lines == 1)

        folders = [str(tmp / "films" / f"{i:02d}")
                   for i in range(max(1, min(args.compare_files, args.files) // PER_FOLDER))]
        n_subset = min(args.files, len(folders) * PER_FOLDER)
        log.info("run 2: --decode-workers 0 vs default on %d files", n_subset)
        compare = {}
        for label, extra in (("decode_workers_0", ["--decode-workers", "0"]), ("decode_workers_default", [])):
            r = run_predict([str(ckpt), *folders, "--batch-size", str(args.batch_size), *extra],
                            tmp / f"{label}.csv")
            r["img_per_s"] = _rate(_complete_rows(tmp / f"{label}.csv"), r)
            compare[label] = r
        return {"files": args.files, "batch_size": args.batch_size, "copy_s": round(copy_s, 1),
                "source": "../shared/data/chest_xray (*.jpeg, cycled)", "model": model,
                "kill_and_resume": {"killed": killed, "resumed": resumed, "check": resume_check},
                "decode_workers": {"files": n_subset, **compare}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(record: dict[str, Any]) -> str:
    r = record["result"]
    kr, dw = r["kill_and_resume"], r["decode_workers"]
    k, res, chk = kr["killed"], kr["resumed"], kr["check"]
    hw = record["hardware"]
    flow = [x["rss_mib"] for x in k["rss_samples"] if x["rows"] > 0] or [float("nan")]

    def row(name: str, x: dict[str, Any], rows: int) -> str:
        return f"| {name} | {rows:,} | {x['wall_s']} | {x['img_per_s']} | {x['peak_rss_mib']} |"

    lines = [
        f"# predict over {r['files']:,} files (CPU)", "",
        f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores available, torch threads "
        f"{hw['torch_threads']}, {hw.get('memory_gib', '?')} GiB; load average {hw['load_average_1m']} "
        "at the start: a machine shared with other jobs, so the speeds below are noisy and only "
        f"their order of magnitude carries. Run {record['started_utc']} – {record['finished_utc']} "
        f"UTC; commit {record['versions']['git_commit']}.", "",
        f"Films: {r['source']}, copied into a temporary folder deleted afterwards. Model: "
        f"{r['model']['model']} at {r['model']['image_size']} px, {r['model']['weights']} (its "
        f"probabilities mean nothing); gate: {r['model']['gate']}. Batch size {r['batch_size']}. "
        "Each run is `python -m pneumoscope predict` in a subprocess. img/s: rows from the first "
        "row written to the end (start-up, scan and model load excluded); peak RSS: the process's "
        "VmHWM.", "",
        "| run | rows written | wall s | img/s | peak RSS MiB |", "|---|---:|---:|---:|---:|",
        row(f"all {r['files']:,} files, killed (SIGKILL) at about half", k, k["rows_complete_at_kill"]),
        row("same command + `--resume`", res, r["files"] - k["rows_complete_at_kill"]),
        row(f"first {dw['files']:,} files, `--decode-workers 0`", dw["decode_workers_0"],
            dw["decode_workers_0"]["rows_in_file"]),
        row(f"first {dw['files']:,} files, default decode workers", dw["decode_workers_default"],
            dw["decode_workers_default"]["rows_in_file"]),
        "", "## kill -9 and --resume", "",
        f"- killed with {k['rows_complete_at_kill']:,} complete rows on disk after {k['wall_s']} s;",
        f"- `--resume` printed: `{' '.join(res['summary_line'])}`;",
        f"- final file: {chk['rows']:,} rows, {chk['unique_paths']:,} distinct paths, same set as the "
        f"inputs: {chk['same_set_as_inputs']}, header lines: {chk['header_lines']}, error rows: "
        f"{chk['error_rows']} → **{'passed' if chk['passed'] else 'FAILED'}**.", "",
        "## Memory over the killed run", "",
        f"RSS when the first row was written: {flow[0]} MiB; from then to the kill: {min(flow)}–"
        f"{max(flow)} MiB over {k['rows_complete_at_kill']:,} rows (imports and the model are most "
        "of it).", "",
        "| t s | rows | RSS MiB |", "|---:|---:|---:|",
        *[f"| {s['t_s']} | {s['rows']:,} | {s['rss_mib']} |"
          for s in k["rss_samples"][::max(1, len(k["rss_samples"]) // 12)]], "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--compare-files", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--tag", default="predict-scale-cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    record: dict[str, Any] = {"benchmark": "predict_scale", "started_utc": started,
                              "hardware": hardware(), "versions": versions()}
    record["result"] = run(args)
    record["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    md = markdown(record)
    (RESULTS / f"{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
