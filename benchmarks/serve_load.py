"""Load test of the web service on this machine: throughput, latency percentiles, errors, peak RSS.

    python benchmarks/serve_load.py --checkpoint runs/efficientnet_lite0-seed42/model.safetensors
    python benchmarks/serve_load.py --clients 4 --requests 25     # random-init model, see below

For each backend (torch, then onnx) it starts ``pneumoscope serve`` in a subprocess on
127.0.0.1 (a free port, the console script's malloc settings), waits for ``/healthz``, sends a few
warm-up requests, then runs ``--clients`` threads that each POST ``--requests`` images to
``/v1/predict`` (a bounded loop: clients x requests in all) and stops the server. Peak RSS is the
server process's ``VmHWM`` (Linux). Without ``--checkpoint`` the model is a **random-init
EfficientNet-Lite0 at 224 px** made on the fly: the timings are those of the real architecture,
the probabilities are meaningless. Writes ``benchmarks/results/<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"  # loopback only: the benchmark never listens on or calls another address

log = logging.getLogger("serve_load")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def random_checkpoint(folder: Path, image_size: int) -> Path:
    """A random-init efficientnet_lite0 checkpoint (timing only: its outputs mean nothing)."""
    import torch

    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", "none", image_size=image_size).eval()
    info = CheckpointInfo(model="efficientnet_lite0", preprocessing=model.preprocessing,
                          threshold_method="random-init (benchmark only)")
    return save_checkpoint(folder / "random-efficientnet_lite0.safetensors", model, info)


def test_image(size: int) -> bytes:
    """A synthetic chest phantom as a JPEG of ``size`` px: decoding is part of every request."""
    import numpy as np
    from PIL import Image

    from pneumoscope.data.synthetic import make_phantom

    buf = io.BytesIO()
    Image.fromarray(make_phantom(np.random.default_rng(0), size, pneumonia=True)).save(
        buf, format="JPEG", quality=92)
    return buf.getvalue()


def status_mib(pid: int, field: str) -> float | None:
    """A memory field of ``/proc/PID/status`` (``VmHWM`` peak, ``VmRSS`` now) in MiB (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Server:
    """``pneumoscope serve`` in a subprocess, stopped on exit."""

    def __init__(self, checkpoint: Path, backend: str, log_file: Path, startup_timeout: float = 180,
                 extra_args: tuple[str, ...] = ()) -> None:
        from pneumoscope.runtime import FAST_MALLOC_ENV

        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.command = [sys.executable, "-m", "pneumoscope", "serve", str(checkpoint), "--host", HOST,
                        "--port", str(self.port), "--backend", backend, *extra_args]
        env = {**os.environ, **FAST_MALLOC_ENV}  # what the `pneumoscope` console script sets
        self._log = log_file.open("w")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not answer /healthz within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def run_load(url: str, image: bytes, clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads x ``requests`` POSTs each; latencies measured by the client."""
    import httpx

    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(requests):
                start = time.perf_counter()
                try:
                    r = http.post("/v1/predict", files={"file": ("x.jpg", image, "image/jpeg")})
                    ok = r.status_code == 200
                    detail = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                elapsed = 1000 * (time.perf_counter() - start)
                with lock:
                    if ok:
                        latencies.append(elapsed)
                        server_ms.append(r.json()["latency_ms"])
                    else:
                        errors.append(detail)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"requests": clients * requests, "ok": len(latencies), "errors": len(errors),
                           "error_examples": errors[:3], "wall_s": round(wall, 2),
                           "throughput_rps": round(len(latencies) / wall, 2)}
    if latencies:
        out.update({f"latency_p{q}_ms": round(_percentile(latencies, q), 1) for q in (50, 95, 99)})
        out["latency_mean_ms"] = round(statistics.fmean(latencies), 1)
        out["latency_max_ms"] = round(max(latencies), 1)
        out["server_latency_p50_ms"] = round(_percentile(server_ms, 50), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.safetensors (default: random-init "
                        "efficientnet_lite0 at 224 px, timings only)")
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-px", type=int, default=1024, help="side of the test JPEG")
    parser.add_argument("--model-px", type=int, default=224, help="input size of the random model")
    parser.add_argument("--tag", default="serve-load-cpu")
    args = parser.parse_args()
    if args.clients < 1 or args.requests < 1 or args.clients * args.requests > 100_000:
        parser.error("need 1 <= clients x requests <= 100000")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    from pneumoscope.models.checkpoint import read_info

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.checkpoint is None:
            checkpoint = random_checkpoint(Path(tmp), args.model_px)
            source = (f"random-init efficientnet_lite0 at {args.model_px} px, made on the fly "
                      "(no --checkpoint): real architecture and cost, meaningless outputs")
        else:
            checkpoint = args.checkpoint
            source = f"checkpoint {checkpoint}"
        info = read_info(checkpoint)
        image = test_image(args.image_px)
        runs: dict[str, Any] = {}
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            log.info("%s backend: starting the server", backend)
            server = Server(checkpoint, backend, Path(tmp) / f"server-{backend}.log")
            try:
                import httpx

                for _ in range(args.warmup):
                    httpx.post(f"{server.url}/v1/predict", files={"file": ("x.jpg", image)}, timeout=120)
                load_before = round(os.getloadavg()[0], 2)
                result = run_load(server.url, image, args.clients, args.requests)
                result.update(load_average_1m_before=load_before,
                              load_average_1m_after=round(os.getloadavg()[0], 2),
                              server_peak_rss_mib=status_mib(server.proc.pid, "VmHWM"),
                              server_command=shlex.join(server.command))
            finally:
                server.stop()
            runs[backend] = result
            shown = {k: v for k, v in result.items() if k != "server_command"}
            log.info("%s: %s", backend, json.dumps(shown))

    record = {"benchmark": args.tag, "command": shlex.join([sys.executable, *sys.argv]),
              "model": {"name": info.model, "image_size": info.preprocessing.image_size, "source": source},
              "load": {"clients": args.clients, "requests_per_client": args.requests,
                       "warmup_requests": args.warmup, "endpoint": "POST /v1/predict",
                       "image": f"synthetic phantom JPEG {args.image_px}x{args.image_px} px, "
                                f"{len(image)} bytes"},
              "hardware": hardware(), "versions": versions(), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{args.tag}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    hw, load, model = record["hardware"], record["load"], record["model"]
    lines = [f"# {record['benchmark']}", "",
             f"Command: `{record['command']}`  ",
             f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores available, "
             f"{hw.get('memory_gib', '?')} GiB, GPU: {hw['gpu'] or 'none'}; load average (1 min) at "
             f"the end: {hw['load_average_1m']} (a shared machine: numbers move with it)  ",
             f"Model: {model['name']} at {model['image_size']} px — {model['source']}  ",
             f"Load: {load['clients']} concurrent clients x {load['requests_per_client']} requests "
             f"({load['endpoint']}, {load['image']}; {load['warmup_requests']} warm-up requests "
             "not counted); latency measured by the client over loopback", "",
             "| backend | requests | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms | "
             "server p50 ms | peak RSS MiB | load avg before/after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for backend, r in record["runs"].items():
        lines.append(f"| {backend} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | "
                     f"{r.get('latency_p50_ms', '-')} | {r.get('latency_p95_ms', '-')} | "
                     f"{r.get('latency_p99_ms', '-')} | {r.get('server_latency_p50_ms', '-')} | "
                     f"{r['server_peak_rss_mib']} | {r['load_average_1m_before']} / "
                     f"{r['load_average_1m_after']} |")
    lines += ["", versions_line(record["versions"]), ""]
    return "\n".join(lines)


def versions_line(v: dict[str, str]) -> str:
    return (f"Versions: python {v['python']}, torch {v['torch']}, pneumoscope {v['pneumoscope']}"
            f"{', commit ' + v['git_commit'] if v.get('git_commit') else ''}.")


if __name__ == "__main__":
    main()
