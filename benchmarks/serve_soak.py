"""Soak test of the web service: normal traffic mixed with slow, abandoned, oversized and absurd
requests; errors, latency and the server's memory over time.

    python benchmarks/serve_soak.py              # ~2.5 min: 15 s baseline, 120 s mixed, 15 s after
    python benchmarks/serve_soak.py --quick      # ~30 s smoke run (short timeouts): prints, saves nothing

It starts ``pneumoscope serve`` in a subprocess on 127.0.0.1 only (a free port; the same
``Server`` as ``serve_load.py``) with a random-init EfficientNet-Lite0 made in a temporary folder
(``--model-px``, default 128: the timings are the architecture's, the probabilities mean nothing),
then runs three phases, each bounded in time, and stops by itself:

1. baseline: ``--normal-clients`` threads POST a synthetic phantom JPEG to ``/v1/predict`` in a loop;
2. mixed: the same normal traffic, plus ``--slow-clients`` uploads trickling 1 byte / 0.5 s
   (expected: 408 after the body timeout), ``--slow-header-clients`` connections trickling their
   headers (expected: closed after the header timeout), an abandoned upload every 0.5 s (headers
   and part of the body sent, then the socket closed), an oversized body every second
   (alternately a 25 MiB ``Content-Length`` and a chunked body with no length; expected: 413),
   and an 8 x 3000 px PNG to ``/v1/explain`` every second (expected: 422);
3. after: normal traffic alone again.

Every second it samples the server's ``VmRSS`` from ``/proc/PID/status`` and the latency of
``/healthz``. Reported: the outcome of every request by kind, errors of the normal traffic (any
non-200), its latency percentiles per phase, the RSS curve, and the count of tracebacks and
disconnect lines in the server log. Writes ``benchmarks/results/<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import select
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions
from serve_load import (
    HOST,
    RESULTS,
    Server,
    _percentile,
    random_checkpoint,
    status_mib,
    test_image,
    versions_line,
)

log = logging.getLogger("serve_soak")

BOUNDARY = "soakBoundary"
OVERSIZED_BYTES = 25 * 2**20


def _head(port: int, path: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{size}\r\n\r\n").encode()


def _part_head() -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()


def _status(sock: socket.socket, timeout: float) -> str:
    """The HTTP status the server answered on ``sock`` (``"closed"`` if it closed without one)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, OSError):
        return "closed" if not data else "no-answer"
    if not data:
        return "closed"
    parts = data.split(b"\r\n", 1)[0].split()
    return parts[1].decode() if len(parts) > 1 else "garbled"


def _answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


class Soak:
    """The clients of one run; every loop ends when ``stop`` is set."""

    def __init__(self, url: str, port: int, image: bytes, sliver: bytes) -> None:
        self.url, self.port, self.image, self.sliver = url, port, image, sliver
        self.stop = threading.Event()  # ends the normal clients and the sampler
        self.mixed_over = threading.Event()  # ends the adversarial clients
        self.lock = threading.Lock()
        self.outcomes: dict[str, Counter[str]] = {}
        self.normal: dict[str, list[float]] = {}
        self.normal_errors: list[str] = []
        self.held_s: dict[str, list[float]] = {}
        self.aspect_ms: list[float] = []
        self.phase = "baseline"

    def _count(self, kind: str, outcome: str, held: float | None = None) -> None:
        with self.lock:
            self.outcomes.setdefault(kind, Counter())[outcome] += 1
            if held is not None:
                self.held_s.setdefault(kind, []).append(held)

    def normal_client(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                phase, start = self.phase, time.perf_counter()
                try:
                    r = http.post("/v1/predict", files={"file": ("x.jpg", self.image, "image/jpeg")})
                    outcome = str(r.status_code)
                    detail = "" if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    outcome, detail = type(exc).__name__, f"{type(exc).__name__}: {exc}"
                elapsed = 1000 * (time.perf_counter() - start)
                self._count("normal predict", outcome)
                with self.lock:
                    if detail:
                        self.normal_errors.append(f"{phase}: {detail}")
                    else:
                        self.normal.setdefault(phase, []).append(elapsed)

    def _trickle(self, kind: str, opening: bytes, byte: bytes) -> None:
        """Connections that send ``opening``, then ``byte`` every 0.5 s until the server answers
        or closes; the outcome and how long the connection was held are counted under ``kind``."""
        while not self.mixed_over.is_set():
            start = time.monotonic()
            with socket.create_connection((HOST, self.port), timeout=10) as sock:
                sock.sendall(opening)
                while not self.mixed_over.is_set() and not _answered(sock):
                    time.sleep(0.5)
                    try:
                        sock.send(byte)
                    except OSError:
                        break
                if self.mixed_over.is_set() and not _answered(sock):
                    return  # cut by the end of the run, not by the server: not counted
                self._count(kind, _status(sock, 5), time.monotonic() - start)

    def slow_client(self) -> None:
        """An upload trickling 1 byte every 0.5 s."""
        self._trickle("slow upload (1 B / 0.5 s)", _head(self.port, "/v1/predict", 100_000) + _part_head(),
                      b"\0")

    def slow_header_client(self) -> None:
        """Request headers trickling 1 byte every 0.5 s."""
        self._trickle("slow headers (1 B / 0.5 s)", b"POST /v1/predict HTTP/1.1\r\n", b"X")

    def every(self, period: float, action: Callable[[int], None]) -> Callable[[], None]:
        def loop() -> None:
            i = 0
            while not self.mixed_over.wait(period):
                action(i)
                i += 1
        return loop

    def abandoned(self, _: int) -> None:
        """Headers and 200 KB of a 2 MB upload, then the socket closed."""
        with socket.create_connection((HOST, self.port), timeout=10) as sock:
            sock.sendall(_head(self.port, "/v1/predict", 2_000_000) + _part_head() + b"\x89PNG"
                         + b"\0" * 200_000)
        self._count("abandoned upload", "sent, then closed")

    def oversized(self, i: int) -> None:
        chunk = b"\0" * 65536
        with socket.create_connection((HOST, self.port), timeout=10) as sock:
            if i % 2 == 0:  # the header says it all: refused before the body is read
                kind = "oversized, 25 MiB Content-Length"
                sock.sendall(_head(self.port, "/v1/predict", OVERSIZED_BYTES) + _part_head())
            else:  # no length: refused while reading, when the count passes the limit
                kind = "oversized, chunked (no length)"
                sock.sendall(_head(self.port, "/v1/predict", None))
                sent, first = 0, _part_head()
                while sent < OVERSIZED_BYTES and not _answered(sock):
                    data = first + chunk if sent == 0 else chunk
                    try:
                        sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    except OSError:
                        break
                    sent += len(data)
            self._count(kind, _status(sock, 10))

    def absurd_explain(self, _: int) -> None:
        import httpx

        start = time.perf_counter()
        try:
            r = httpx.post(f"{self.url}/v1/explain", files={"file": ("s.png", self.sliver, "image/png")},
                           timeout=60)
            outcome = str(r.status_code)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        with self.lock:
            self.aspect_ms.append(1000 * (time.perf_counter() - start))
        self._count("8x3000 PNG to /v1/explain", outcome)


def sampler(soak: Soak, pid: int, t0: float, out: list[dict[str, Any]]) -> None:
    import httpx

    while not soak.stop.is_set():
        start = time.perf_counter()
        try:
            health = httpx.get(f"{soak.url}/healthz", timeout=10)
            in_progress = health.json().get("uploads_in_progress")
            health_ms = round(1000 * (time.perf_counter() - start), 1)
        except httpx.HTTPError:
            in_progress, health_ms = None, None
        out.append({"t_s": round(time.monotonic() - t0, 1), "phase": soak.phase,
                    "rss_mib": status_mib(pid, "VmRSS"), "healthz_ms": health_ms,
                    "uploads_in_progress": in_progress})
        soak.stop.wait(max(0.0, 1.0 - (time.perf_counter() - start)))


def _latency(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), **{f"p{q}_ms": round(_percentile(values, q), 1) for q in (50, 95, 99)},
            "max_ms": round(max(values), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run with short timeouts")
    parser.add_argument("--baseline-s", type=float, default=15)
    parser.add_argument("--mixed-s", type=float, default=120)
    parser.add_argument("--after-s", type=float, default=15)
    parser.add_argument("--normal-clients", type=int, default=4)
    parser.add_argument("--slow-clients", type=int, default=6)
    parser.add_argument("--slow-header-clients", type=int, default=4)
    parser.add_argument("--model-px", type=int, default=128)
    parser.add_argument("--image-px", type=int, default=1024)
    parser.add_argument("--tag", help="result file name (default serve-soak-cpu; --quick saves only "
                        "when given one)")
    args = parser.parse_args()
    from pneumoscope.serve.limits import ServeLimits

    limits = ServeLimits()
    save = args.tag is not None or not args.quick
    args.tag = args.tag or ("serve-soak-quick" if args.quick else "serve-soak-cpu")
    if args.quick:
        args.baseline_s, args.mixed_s, args.after_s = 3, 15, 3
        limits = ServeLimits(body_timeout_s=4, header_timeout_s=3)
    if args.baseline_s + args.mixed_s + args.after_s > 180:
        parser.error("the phases must add up to at most 180 s")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    server_args = ("--max-uploads", str(limits.max_uploads), "--body-timeout", f"{limits.body_timeout_s:g}",
                   "--header-timeout", f"{limits.header_timeout_s:g}", "--keep-alive",
                   f"{limits.keep_alive_s:g}", "--max-connections", str(limits.max_connections))

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 3000), 90).save(buf, format="PNG")
    sliver = buf.getvalue()
    image = test_image(args.image_px)
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as tmp:
        checkpoint = random_checkpoint(Path(tmp), args.model_px)
        log_path = Path(tmp) / "server.log"
        server = Server(checkpoint, "torch", log_path, extra_args=server_args)
        try:
            import httpx

            for _ in range(3):  # warm-up, not counted
                httpx.post(f"{server.url}/v1/predict", files={"file": ("x.jpg", image)}, timeout=120)
            soak = Soak(server.url, server.port, image, sliver)
            t0 = time.monotonic()
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            load_before = round(os.getloadavg()[0], 2)
            background = [threading.Thread(target=sampler, args=(soak, server.proc.pid, t0, samples))]
            background += [threading.Thread(target=soak.normal_client) for _ in range(args.normal_clients)]
            for t in background:
                t.start()
            soak.stop.wait(args.baseline_s)
            log.info("mixed traffic for %.0f s", args.mixed_s)
            soak.phase = "mixed"
            adversaries = ([threading.Thread(target=soak.slow_client) for _ in range(args.slow_clients)]
                           + [threading.Thread(target=soak.slow_header_client)
                              for _ in range(args.slow_header_clients)]
                           + [threading.Thread(target=soak.every(0.5, soak.abandoned)),
                              threading.Thread(target=soak.every(1.0, soak.oversized)),
                              threading.Thread(target=soak.every(1.0, soak.absurd_explain))])
            for t in adversaries:
                t.start()
            soak.stop.wait(args.mixed_s)
            soak.mixed_over.set()
            for t in adversaries:
                t.join(timeout=30)
            soak.phase = "after"
            log.info("normal traffic alone for %.0f s", args.after_s)
            soak.stop.wait(args.after_s)
            soak.stop.set()
            for t in background:
                t.join(timeout=130)
            wall = time.monotonic() - t0
            peak = status_mib(server.proc.pid, "VmHWM")
            still_running = [t.name for t in adversaries + background if t.is_alive()]
        finally:
            server.stop()
        server_log = log_path.read_text(errors="replace")
    load_after = round(os.getloadavg()[0], 2)

    rss = [s["rss_mib"] for s in samples if s["rss_mib"] is not None]
    by_phase = {p: [s["rss_mib"] for s in samples if s["phase"] == p and s["rss_mib"] is not None]
                for p in ("baseline", "mixed", "after")}
    health = [s["healthz_ms"] for s in samples if s["healthz_ms"] is not None]
    record = {
        "benchmark": args.tag, "command": shlex.join([sys.executable, *sys.argv]), "started_utc": started,
        "model": {"name": "efficientnet_lite0", "image_size": args.model_px,
                  "source": "random-init, made in a temporary folder (timings only; outputs meaningless)"},
        "server": {"command": shlex.join(server.command), "limits": limits.__dict__,
                   "host": HOST, "backend": "torch"},
        "traffic": {"phases_s": {"baseline": args.baseline_s, "mixed": args.mixed_s, "after": args.after_s},
                    "normal_clients": args.normal_clients, "slow_clients": args.slow_clients,
                    "slow_header_clients": args.slow_header_clients,
                    "abandoned_every_s": 0.5, "oversized_every_s": 1.0, "absurd_explain_every_s": 1.0,
                    "image": f"synthetic phantom JPEG {args.image_px}x{args.image_px} px, "
                             f"{len(image)} bytes"},
        "wall_s": round(wall, 1), "threads_left_running": still_running,
        "outcomes": {kind: dict(c) for kind, c in sorted(soak.outcomes.items())},
        "normal": {"requests": sum(soak.outcomes.get("normal predict", Counter()).values()),
                   "errors": len(soak.normal_errors), "error_examples": soak.normal_errors[:5],
                   "latency": {p: _latency(soak.normal.get(p, [])) for p in ("baseline", "mixed", "after")}},
        "held_s": {k: {"n": len(v), "median": round(_percentile(v, 50), 1), "max": round(max(v), 1)}
                   for k, v in soak.held_s.items() if v},
        "absurd_explain_latency": _latency(soak.aspect_ms),
        "healthz_latency": _latency(health),
        "rss_mib": {"start": rss[0] if rss else None, "max": max(rss) if rss else None,
                    "end": rss[-1] if rss else None, "peak_vmhwm": peak,
                    **{f"max_{p}": max(v) if v else None for p, v in by_phase.items()}},
        "server_log": {"tracebacks": server_log.count("Traceback"),
                       "disconnect_lines": server_log.count("disconnected during the upload"),
                       "header_timeout_lines": server_log.count("no complete request headers"),
                       "lines": server_log.count("\n")},
        "samples": samples,
        "load_average_1m": {"before": load_before, "after": load_after},
        "hardware": hardware(), "versions": versions(),
    }
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / f"{args.tag}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    hw, tr, normal, rss = record["hardware"], record["traffic"], record["normal"], record["rss_mib"]
    lim = record["server"]["limits"]
    phases = tr["phases_s"]
    lines = [f"# {record['benchmark']}", "",
             f"Command: `{record['command']}` (started {record['started_utc']}, {record['wall_s']} s)  ",
             f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores available, "
             f"{hw.get('memory_gib', '?')} GiB, GPU: {hw['gpu'] or 'none'}; load average (1 min) "
             f"{record['load_average_1m']['before']} before, {record['load_average_1m']['after']} after "
             "(a shared machine: latencies move with it)  ",
             f"Model: {record['model']['name']} at {record['model']['image_size']} px — "
             f"{record['model']['source']}  ",
             f"Server: `pneumoscope serve` on {record['server']['host']} (torch), max_uploads "
             f"{lim['max_uploads']}, body timeout {lim['body_timeout_s']:g} s, header timeout "
             f"{lim['header_timeout_s']:g} s, keep-alive {lim['keep_alive_s']:g} s, max_connections "
             f"{lim['max_connections']}  ",
             f"Phases: {phases['baseline']:g} s normal traffic, {phases['mixed']:g} s mixed, "
             f"{phases['after']:g} s normal again; {tr['normal_clients']} normal clients ({tr['image']}), "
             f"{tr['slow_clients']} slow uploads and {tr['slow_header_clients']} slow-header connections "
             "at a time, an abandoned upload every 0.5 s, an oversized body and an 8x3000 explain every 1 s",
             "", "## Normal traffic (POST /v1/predict)", "",
             f"{normal['requests']} requests, **{normal['errors']} errors**"
             + (f" (e.g. {normal['error_examples'][0]})" if normal["errors"] else "") + ".", "",
             "| phase | requests | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for phase, lat in normal["latency"].items():
        lines.append(f"| {phase} | {lat['n']} | {lat.get('p50_ms', '-')} | {lat.get('p95_ms', '-')} | "
                     f"{lat.get('p99_ms', '-')} | {lat.get('max_ms', '-')} |")
    lines += ["", "## Every request by kind (HTTP status, or what the connection did)", "",
              "| kind | outcomes | held open (median / max s) |", "|---|---|---|"]
    for kind, outcomes in record["outcomes"].items():
        held = record["held_s"].get(kind)
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
        held_text = f"{held['median']} / {held['max']}" if held else "-"
        lines.append(f"| {kind} | {shown} | {held_text} |")
    ae, hz, log_ = record["absurd_explain_latency"], record["healthz_latency"], record["server_log"]
    lines += ["", f"8x3000 explain answered in p50 {ae.get('p50_ms', '-')} ms / max "
              f"{ae.get('max_ms', '-')} ms; `/healthz` (sampled every second) p95 {hz.get('p95_ms', '-')} ms "
              f"/ max {hz.get('max_ms', '-')} ms.  ",
              f"Server log: {log_['tracebacks']} tracebacks, {log_['disconnect_lines']} one-line disconnect "
              f"notes, {log_['header_timeout_lines']} header-timeout notes, {log_['lines']} lines in all.",
              "",
              "## Server memory (VmRSS, sampled every second)", "",
              f"Start {rss['start']} MiB, max {rss['max']} MiB (baseline {rss['max_baseline']}, mixed "
              f"{rss['max_mixed']}, after {rss['max_after']}), end {rss['end']} MiB; peak (VmHWM) "
              f"{rss['peak_vmhwm']} MiB.", "", "| t (s) | phase | RSS MiB | uploads in progress |",
              "|---|---|---|---|"]
    samples = record["samples"]
    step = max(1, len(samples) // 24)
    for s in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        lines.append(f"| {s['t_s']} | {s['phase']} | {s['rss_mib']} | {s['uploads_in_progress']} |")
    lines += ["", f"{versions_line(record['versions'])} All samples in the JSON.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
