"""Speed, round 2: full-size films (decode at the needed size), a batching service and INT8 ONNX.

    python benchmarks/speed2.py                 # the saved result (about 6 min on 2 cores)
    python benchmarks/speed2.py --quick         # smoke run: tiny sizes, not a result

Sections (``--only`` picks some):
  decode   the shared full-size films (../shared/data/fullres_samples): full decode + resize
           to 224 vs the draft path (JPEG DCT scaling, ``DRAFT_MARGIN`` 2, and 1 for reference):
           max / mean pixel difference and decode time; the same for a synthetic 12-bit DICOM.
  predict  one 2048-px JPEG through ``Predictor.predict_files`` (checkpoint → probability,
           decode included), batch 1, draft vs full decode, torch and onnx backends.
  folder   ``predict_to_file`` over >= 1,000 full-size films (the shared films re-encoded at
           several sizes and qualities into a temporary folder, deleted at the end): today's
           path (full decode, no decode workers), draft only, and the new default (draft +
           decode workers); torch and onnx backends, and the INT8 model on the new path.
  serve    ``pneumoscope serve`` in a subprocess, 16 concurrent clients, 224-px and full-size
           uploads, batching on (``--batch-max 16``) vs off (``--batch-max 1``), both backends;
           and one client alone (p95) for both settings; the mean batch the server ran (its
           /healthz counters); the model call alone per image at batch 1, 4, 16; and the HTTP
           floor: 16 clients posting the same bytes as a non-image, answered 415 after the
           upload is read (no decode, no model).
  int8     ONNX Runtime at batch 32: fp32 vs the INT8 model of ``export.quantize`` (calibrated
           on 64 validation films of ../shared/data/chest_xray), for EfficientNet-Lite0 and
           ResNet-18.

Models are random-init at 224 px (timings are those of the real architectures; the outputs mean
nothing), so the INT8 parity rule (which needs a trained model's validation AUC) is not part of
this benchmark: ``pneumoscope export --quantize int8`` applies it to a real model, and
benchmarks/int8_parity.py measures it on trained ones. Every
measurement runs in a fresh subprocess (speed.py's convention). Writes
``benchmarks/results/speed2-cpu.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import _env, _latency_ms, _timed_calls  # noqa: E402

RESULTS = HERE / "results"
SECTIONS = ("decode", "predict", "folder", "serve", "int8")
SHARED = HERE.parent.parent / "shared" / "data"
FULLRES = SHARED / "fullres_samples"
SEED = 0
MODEL = "efficientnet_lite0"
SIZE = 224


def _films() -> list[Path]:
    return sorted(p for p in FULLRES.rglob("*.jpeg"))


def _checkpoint(folder: Path, model: str = MODEL, size: int = SIZE) -> Path:
    import torch

    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model

    torch.manual_seed(SEED)
    net = build_model(model, "none", image_size=size).eval()
    info = CheckpointInfo(model=model, preprocessing=net.preprocessing,
                          threshold_method="random-init (benchmark only)")
    return save_checkpoint(folder / f"{model}.safetensors", net, info)


def _reencode(src: Path, long_side: int, quality: int) -> bytes:
    from PIL import Image

    img = Image.open(src).convert("L")
    scale = long_side / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- workers

def work_decode(spec: dict[str, Any]) -> dict[str, Any]:
    from pneumoscope.data import decode

    films = _films()[:spec["n_films"]]
    rows = []
    for path in films:
        data = path.read_bytes()
        full_t, full = _best(lambda d=data: decode.resize_square(decode.decode_image(d).gray, SIZE))
        row: dict[str, Any] = {"film": path.name, "size": list(decode.decode_image(data).gray.shape[::-1]),
                               "full_ms": full_t}
        for margin in (2, 1):
            decode.DRAFT_MARGIN = margin
            t, small = _best(lambda d=data: decode.resize_square(
                decode.decode_image(d, draft_size=SIZE).gray, SIZE))
            diff = np.abs(full.astype(int) - small.astype(int))
            row[f"margin{margin}"] = {"ms": t, "max_diff": int(diff.max()), "mean_diff": float(diff.mean()),
                                      "p99_diff": float(np.percentile(diff, 99))}
        decode.DRAFT_MARGIN = 2
        rows.append(row)
    out: dict[str, Any] = {"films": rows}
    for margin in (2, 1):
        key = f"margin{margin}"
        out[key] = {"max_diff": max(r[key]["max_diff"] for r in rows),
                    "mean_diff": statistics.fmean(r[key]["mean_diff"] for r in rows),
                    "median_speedup": statistics.median(r["full_ms"] / r[key]["ms"] for r in rows)}
    out["dicom"] = _dicom_decode(films[0])
    return out


def _best(fn: Any, n: int = 3) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(n):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times), result


def _dicom_decode(film: Path) -> dict[str, Any]:
    """A 12-bit DICOM film of 2500x3000 (a shared film scaled up), with a window."""
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pneumoscope.data.decode import decode_image, resize_square

    pixels = np.asarray(Image.open(film).convert("L").resize((2500, 3000), Image.Resampling.BICUBIC))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("film.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", 3000, 2500
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 3500
    ds.PixelData = (pixels.astype("<u2") * 16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    full_t, full = _best(lambda: resize_square(decode_image(data).gray, SIZE))
    draft_t, small = _best(lambda: resize_square(decode_image(data, draft_size=SIZE).gray, SIZE))
    diff = np.abs(full.astype(int) - small.astype(int))
    return {"size": [2500, 3000], "full_ms": full_t, "draft_ms": draft_t, "speedup": full_t / draft_t,
            "max_diff": int(diff.max()), "mean_diff": float(diff.mean())}


def work_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """``Predictor.predict_files([path])`` for one 2048-px JPEG, batch 1, full and draft decode
    in one process, call by call in turn (process-to-process noise on these cores is larger than
    the effect)."""
    from PIL import Image

    from pneumoscope.data.synthetic import make_phantom
    from pneumoscope.serve.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp))
        inputs = {}
        # The round-1 input (a phantom blown up to 2048 px) and a real film re-encoded at 2048 px.
        phantom = make_phantom(np.random.default_rng(SEED), size=SIZE, pneumonia=True)
        inputs["2048px-phantom"] = Path(tmp) / "phantom.jpeg"
        Image.fromarray(phantom).resize((2048, 2048), Image.Resampling.BICUBIC).save(
            inputs["2048px-phantom"], quality=90)
        inputs["2048px-film"] = Path(tmp) / "film.jpeg"
        inputs["2048px-film"].write_bytes(_reencode(_films()[0], 2048, 90))
        # One predictor (one model session: two ONNX Runtime sessions in a process spin their
        # thread pools against each other), its decode switched call by call.
        predictor = Predictor(ckpt, spec["backend"])
        modes = ("full", "draft")
        out: dict[str, dict[str, Any]] = {m: {} for m in modes}
        for label, path in inputs.items():
            times: dict[str, list[float]] = {m: [] for m in modes}
            for i in range(5 + spec["n_single"]):
                for m in modes:
                    predictor.draft = m == "draft"
                    start = time.perf_counter()
                    predictor.predict_files([path], batch_size=1, progress=False)
                    if i >= 5:  # warm-up
                        times[m].append(time.perf_counter() - start)
            for m in modes:
                predictor.draft = m == "draft"
                # Where the time goes: the decode (+ resize to 224) alone and the model + gate alone.
                decode = _timed_calls(predictor.decode_bytes, path, spec["n_single"], warmup=2)
                decoded = predictor.decode_bytes(path)
                model = _timed_calls(lambda d: predictor.predict_decoded(["x"], [d]), decoded,
                                     spec["n_single"], warmup=2)
                out[m][label] = {**_latency_ms(times[m]), "decode_p50_ms": 1000 * statistics.median(decode),
                                 "model_gate_p50_ms": 1000 * statistics.median(model)}
    return out


def work_batch_cost(spec: dict[str, Any]) -> dict[str, Any]:
    """The service's model call alone (``predict_decoded``: model + gate) per image, by batch size:
    what batching can save at most."""
    from pneumoscope.serve.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        predictor = Predictor(_checkpoint(Path(tmp)), spec["backend"])
    decoded = predictor.decode_bytes(_reencode(_films()[0], SIZE, 92))
    out = {}
    for size in spec.get("sizes", (1, 4, 16)):
        times = _timed_calls(lambda n: predictor.predict_decoded(["x"] * n, [decoded] * n), size,
                             max(2, spec["images"] // size), warmup=2)
        out[str(size)] = 1000 * statistics.median(times) / size
    return {"ms_per_image_by_batch": out}


def work_folder(spec: dict[str, Any]) -> dict[str, Any]:
    """``predict_to_file`` over the folder (the CLI's library call), timed without model load."""
    from pneumoscope.data.inputs import scan_inputs
    from pneumoscope.serve.predict import Predictor, predict_to_file

    predictor = Predictor(spec["checkpoint"], spec["backend"], draft=spec["draft"])
    entries = scan_inputs([spec["folder"]]).entries
    out = Path(spec["out"])
    start = time.perf_counter()
    counts = predict_to_file(predictor, entries, out, batch_size=32, decode_workers=spec["decode_workers"])
    wall = time.perf_counter() - start
    return {"files": len(entries), "rows": counts.rows, "failed": counts.failed, "wall_s": wall,
            "images_per_s": counts.rows / wall}


def work_int8(spec: dict[str, Any]) -> dict[str, Any]:
    from pneumoscope.data.datasets import to_model_input_numpy
    from pneumoscope.export.onnx import INPUT_NAME, OUTPUT_NAME, export_bytes, ort_session
    from pneumoscope.export.quantize import probabilities, quantize_int8
    from pneumoscope.models.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model, info = load_checkpoint(_checkpoint(Path(tmp), spec["model"]))
    images = _val_images(spec["n_calibration"])
    fp32 = export_bytes(model, info)
    start = time.perf_counter()
    int8 = quantize_int8(fp32, images)
    quantize_s = time.perf_counter() - start
    sessions = {"fp32": ort_session(fp32), "int8": ort_session(int8)}
    batch = to_model_input_numpy(np.resize(images, (32, SIZE, SIZE)))
    out: dict[str, Any] = {"quantize_s": quantize_s, "calibration_images": len(images),
                           "fp32_bytes": len(fp32), "int8_bytes": len(int8)}
    for name, session in sessions.items():
        times = _timed_calls(lambda x, s=session: s.run([OUTPUT_NAME], {INPUT_NAME: x}), batch,
                             spec["n_batch"], warmup=2)
        out[name] = {"batch32_images_per_s": 32 / statistics.median(times),
                     "batch32_ms": 1000 * statistics.median(times)}
    out["int8_vs_fp32"] = out["int8"]["batch32_images_per_s"] / out["fp32"]["batch32_images_per_s"]
    p32, p8 = probabilities(sessions["fp32"], images), probabilities(sessions["int8"], images)
    out["random_model_max_abs_prob_diff"] = float(np.max(np.abs(p32 - p8)))
    return out


WORKERS = {"decode": work_decode, "predict": work_predict, "folder": work_folder, "int8": work_int8,
           "batch_cost": work_batch_cost}


def run_worker(kind: str, spec: dict[str, Any], log: Any) -> dict[str, Any]:
    """One measurement in a fresh interpreter (the malloc settings the CLI sets)."""
    keys = ("backend", "draft", "decode_workers", "model")
    label = " ".join(f"{k}={v}" for k, v in spec.items() if k in keys)
    log(f"  {kind} {label} ...")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"kind": kind, **spec})],
                          env=_env(True), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {label} failed:\n{proc.stderr[-4000:]}")
    log(f"    done in {time.perf_counter() - t:.0f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- sections

def section_decode(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    return run_worker("decode", {"n_films": args.n_films}, log)


def section_predict(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    out = {}
    for backend in ("torch", "onnx"):
        both = run_worker("predict", {"backend": backend, "n_single": args.n_single}, log)
        out.update({f"{backend}/{m}": both[m] for m in ("full", "draft")})
    return out


OLD, NEW = "old: full decode, no decode workers", "new: draft + decode workers (default)"
FOLDER_RUNS = {  # name: (backend, draft, decode workers)
    f"torch/{OLD}": ("torch", False, 0),
    "torch/draft only, no decode workers": ("torch", True, 0),
    f"torch/{NEW}": ("torch", True, None),
    "torch/draft + 1 decode worker": ("torch", True, 1),
    f"onnx/{OLD}": ("onnx", False, 0),
    f"onnx/{NEW}": ("onnx", True, None),
    f"onnx int8/{NEW}": ("onnx-int8", True, None),
}


def make_folder(dest: Path, n: int) -> dict[str, Any]:
    """``n`` full-size films: the shared films re-encoded at several sizes and qualities."""
    films = _films()
    sides, qualities = (1024, 1536, 2048, 2560, 3000), (85, 92, 95)
    jobs = [(films[i % len(films)], sides[i % len(sides)], qualities[(i // len(sides)) % len(qualities)], i)
            for i in range(n)]
    cache: dict[tuple[Path, int, int], bytes] = {}

    def one(job: tuple[Path, int, int, int]) -> int:
        film, side, quality, i = job
        key = (film, side, quality)
        if key not in cache:
            cache[key] = _reencode(film, side, quality)
        (dest / f"film{i:05d}-{side}px-q{quality}.jpeg").write_bytes(cache[key])
        return len(cache[key])

    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        sizes = list(pool.map(one, jobs))
    return {"files": n, "long_sides_px": list(sides), "jpeg_qualities": list(qualities),
            "source_films": len(films), "mean_bytes": statistics.fmean(sizes)}


def section_folder(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="speed2-folder-") as tmp:
        folder = Path(tmp) / "films"
        log(f"  writing {args.folder_files} films ...")
        out: dict[str, Any] = {"folder": make_folder(folder, args.folder_files), "runs": {},
                               # The model + gate alone at the folder's batch size: the most images/s
                               # any decoding could reach on these cores.
                               "model_call_ms_per_image_batch32": {
                                   b: run_worker("batch_cost", {"backend": b, "images": 128, "sizes": [32]},
                                                 log)["ms_per_image_by_batch"]["32"]
                                   for b in ("torch", "onnx")}}
        ckpt = _checkpoint(Path(tmp))
        int8 = _int8_file(ckpt, Path(tmp) / "model.int8.onnx")
        for name, (backend, draft, workers) in FOLDER_RUNS.items():
            out["runs"][name] = run_worker("folder", {
                "checkpoint": str(int8 if backend == "onnx-int8" else ckpt),
                "backend": "onnx" if backend == "onnx-int8" else backend, "folder": str(folder),
                "draft": draft,
                "decode_workers": workers, "out": str(Path(tmp) / f"rows-{len(out['runs'])}.csv")}, log)
    runs = out["runs"]
    out["speedup_new_vs_old"] = {b: runs[f"{b}/{NEW}"]["images_per_s"] / runs[f"{b}/{OLD}"]["images_per_s"]
                                 for b in ("torch", "onnx")}
    return out


def _int8_file(ckpt: Path, out: Path) -> Path:
    """The INT8 model of ``ckpt`` (calibrated on 32 validation films; no parity rule: random weights)."""
    from pneumoscope.export.onnx import export_bytes
    from pneumoscope.export.quantize import quantize_int8, with_metadata
    from pneumoscope.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(ckpt)
    out.write_bytes(with_metadata(quantize_int8(export_bytes(model, info), _val_images(32)), info))
    return out


def _val_images(n: int) -> np.ndarray:
    from pneumoscope.data.decode import load_grayscale, resize_square

    files = sorted((SHARED / "chest_xray" / "val").rglob("*.jpeg"))[:n]
    return np.stack([resize_square(load_grayscale(f), SIZE) for f in files])


def section_serve(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from serve_load import Server, run_load, status_mib

    films = _films()
    uploads = {"224px": _reencode(films[0], SIZE, 92), "full-size": _reencode(films[0], 2048, 90)}
    out: dict[str, Any] = {"uploads": {k: len(v) for k, v in uploads.items()}, "runs": {},
                           "model_call_ms_per_image": {
                               b: run_worker("batch_cost", {"backend": b, "images": args.serve_requests * 8},
                                             log)["ms_per_image_by_batch"] for b in ("torch", "onnx")}}
    with tempfile.TemporaryDirectory(prefix="speed2-serve-") as tmp:
        ckpt = _checkpoint(Path(tmp))
        for backend in ("torch", "onnx"):
            for batching, extra in (("off", ("--batch-max", "1")), ("on", ("--batch-max", "16"))):
                log(f"  serve {backend}, batching {batching} ...")
                server = Server(ckpt, backend, Path(tmp) / f"server-{backend}-{batching}.log",
                                extra_args=extra)
                try:
                    import httpx

                    url = f"{server.url}/v1/predict"
                    for data in uploads.values():  # warm-up
                        for _ in range(3):
                            httpx.post(url, files={"file": ("x.jpg", data)}, timeout=120)
                    run: dict[str, Any] = {"server_command": shlex.join(server.command)}
                    for label, data in uploads.items():
                        before = httpx.get(f"{server.url}/healthz").json()["batches"]
                        run[f"16 clients/{label}"] = run_load(server.url, data, 16, args.serve_requests)
                        after = httpx.get(f"{server.url}/healthz").json()["batches"]
                        batches = after["run"] - before["run"]
                        run[f"16 clients/{label}"]["mean_batch"] = (
                            (after["requests"] - before["requests"]) / batches if batches else 1.0)
                        before = httpx.get(f"{server.url}/healthz").json()["batches"]
                        run[f"1 client/{label}"] = run_load(server.url, data, 1, args.single_requests)
                        if batching == "on":  # a lone client takes the solo path (batching off's code)
                            alone = httpx.get(f"{server.url}/healthz").json()["batches"]["alone"]
                            run[f"1 client/{label}"]["solo"] = alone - before["alone"]
                    if batching == "off":
                        run["http floor"] = http_floor(url, len(uploads["224px"]), 16, args.serve_requests)
                    run["server_peak_rss_mib"] = status_mib(server.proc.pid, "VmHWM")
                finally:
                    server.stop()
                out["runs"][f"{backend}/batching-{batching}"] = run
    return out


def http_floor(url: str, n_bytes: int, clients: int, requests: int) -> dict[str, Any]:
    """req/s when every upload is refused right after it is read (415: not an image)."""
    import httpx

    body = b"x" * n_bytes
    times: list[float] = []

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            for _ in range(requests):
                start = time.perf_counter()
                status = http.post(url, files={"file": ("x.bin", body)}).status_code
                if status == 415:
                    times.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    return {"requests": clients * requests, "answered_415": len(times),
            "throughput_rps": round(len(times) / wall, 2),
            "latency_p50_ms": round(1000 * float(np.percentile(times, 50)), 1),
            "latency_p95_ms": round(1000 * float(np.percentile(times, 95)), 1)}


def section_int8(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    return {model: run_worker("int8", {"model": model, "n_batch": args.n_batch,
                                        "n_calibration": args.n_calibration}, log)
            for model in args.int8_models}


# --------------------------------------------------------------------------- report

def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def to_markdown(result: dict[str, Any]) -> str:
    hw, v, s = result["hardware"], result["versions"], result["sections"]
    quick = "  \n**--quick: a smoke run, not a result**" if result["quick"] else ""
    lines = ["# Speed, round 2: full-size films, a batching service, INT8", "",
             f"Command: `{result['command']}`  ",
             f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores, GPU: {hw['gpu'] or 'none'}; "
             f"load average (1 min) at start {result['load_average_start']}, per section below  ",
             f"Versions: python {v['python']}, torch {v['torch']}, onnxruntime {v.get('onnxruntime')}, "
             f"pillow {v.get('pillow')}, pneumoscope {v['pneumoscope']}, git_commit {v['git_commit']}  ",
             f"Wall time: {result['wall_time_s'] / 60:.1f} min{quick}", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += ["Models: random-init EfficientNet-Lite0 at 224 px (ResNet-18 too for INT8): the timings "
              "are the architectures'; the outputs mean nothing. Section load averages (1 min, at "
              "the end of each): " + ", ".join(f"{k} {p['load_average_1m']}"
                                               for k, p in result["provenance"].items()), ""]
    lines += targets(s)
    if "decode" in s:
        lines += _decode_md(s["decode"])
    if "predict" in s:
        lines += ["## Predict path, one 2048-px JPEG per call (checkpoint → probability)", "",
                  "Decode and model + gate: each alone, p50 over the same number of calls (where the "
                  "time goes).", "",
                  "| backend / decode | input | p50 (ms) | p95 (ms) | decode p50 | model + gate p50 |",
                  "|---|---|---|---|---|---|"]
        for key, rows in s["predict"].items():
            lines += [f"| {key} | {inp} | {_f(r['p50_ms'])} | {_f(r['p95_ms'])} | {_f(r['decode_p50_ms'])} "
                      f"| {_f(r['model_gate_p50_ms'])} |" for inp, r in rows.items()]
        lines.append("")
    if "folder" in s:
        lines += _folder_md(s["folder"])
    if "serve" in s:
        lines += _serve_md(s["serve"])
    if "int8" in s:
        lines += ["## INT8 vs fp32 ONNX Runtime, batch 32 at 224 px", "",
                  "Static QDQ quantization (uint8 activations, int8 per-channel weights, MinMax) "
                  "calibrated on validation films of ../shared/data/chest_xray; random-init weights, "
                  "so the parity rule (validation AUC, label agreement) is not measured here.", "",
                  "| model | fp32 img/s | int8 img/s | int8 vs fp32 | file size fp32 → int8 | quantize (s) |",
                  "|---|---|---|---|---|---|"]
        for model, r in s["int8"].items():
            lines.append(f"| {model} | {_f(r['fp32']['batch32_images_per_s'])} | "
                         f"{_f(r['int8']['batch32_images_per_s'])} | **{r['int8_vs_fp32']:.2f}x** | "
                         f"{r['fp32_bytes'] / 2**20:.1f} → {r['int8_bytes'] / 2**20:.1f} MiB | "
                         f"{_f(r['quantize_s'])} |")
        lines.append("")
    lines += gaps(s, hw["cpu_cores_available"])
    lines += ["The training rerun against Keras (`speed.py --only train --repeats 3`, issue #15's last "
              "target) is in speed-cpu.md.", ""]
    return "\n".join(lines)


def _decode_md(d: dict[str, Any]) -> list[str]:
    widths = [r["size"][0] for r in d["films"]]
    lines = ["## Decode at the needed size (shared full-size films → 224 px)", "",
             f"{len(d['films'])} films, {min(widths)}–{max(widths)} px wide; pixel differences in uint8 "
             "levels against a full decode + the same bicubic resize; decode = decode + resize, best of 3.",
             "", "| path | max diff (any film) | mean diff | median decode speed-up |", "|---|---|---|---|"]
    for m in (2, 1):
        r = d[f"margin{m}"]
        lines.append(f"| JPEG draft, margin {m}{' (default)' if m == 2 else ''} | {r['max_diff']} | "
                     f"{r['mean_diff']:.2f} | {r['median_speedup']:.2f}x |")
    dc = d["dicom"]
    return [*lines, f"| DICOM 2500x3000 12-bit, block average before the LUTs | {dc['max_diff']} | "
            f"{dc['mean_diff']:.2f} | {dc['speedup']:.2f}x ({_f(dc['full_ms'])} → {_f(dc['draft_ms'])} ms) |",
            ""]


def _folder_md(f: dict[str, Any]) -> list[str]:
    fo = f["folder"]
    lines = ["## Predict on a folder of full-size films", "",
             f"{fo['files']} JPEGs: the {fo['source_films']} shared films re-encoded at long sides "
             f"{', '.join(map(str, fo['long_sides_px']))} px, quality "
             f"{', '.join(map(str, fo['jpeg_qualities']))} (mean {fo['mean_bytes'] / 1e3:.0f} kB), in a "
             "temporary folder; batch 32, rows appended to a CSV; model load not counted.", "",
             "| backend / path | images/s | wall (s) | failed |", "|---|---|---|---|"]
    lines += [f"| {k} | {_f(r['images_per_s'])} | {_f(r['wall_s'])} | {r['failed']} |"
              for k, r in f["runs"].items()]
    ratios = ", ".join(f"{b} **{x:.2f}x**" for b, x in f["speedup_new_vs_old"].items())
    int8 = f["runs"][f"onnx int8/{NEW}"]["images_per_s"] / f["runs"][f"torch/{OLD}"]["images_per_s"]
    ratios += f"; the new path with the INT8 ONNX model vs the old fp32 torch path **{int8:.2f}x**"
    return [*lines, "", f"New vs old: {ratios}", ""]


def _serve_md(sv: dict[str, Any]) -> list[str]:
    lines = ["## Service: 16 concurrent clients and one client alone", "",
             "`pneumoscope serve` in a subprocess, POST /v1/predict over loopback, clients in the benchmark "
             "process on the same cores; uploads: a shared film re-encoded at 224 px "
             f"({sv['uploads']['224px']} bytes) and at 2048 px ({sv['uploads']['full-size']} bytes). "
             "Batching on: `--batch-max 16 "
             "--batch-wait-ms 5`; off: `--batch-max 1` (round 1's behaviour). Mean batch: requests per "
             "model call (the server's /healthz counters). Server p50: the `latency_ms` the server reports "
             "(decode + batch wait + model, no HTTP). Solo: lone-client requests that took the "
             "batcher's solo path (the same code as batching off; /healthz counters). HTTP floor: "
             "the 224-px upload's size of non-image bytes, refused (415) once read: no decode, no "
             "model.", "",
             "| backend / batching | load / upload | requests | errors | req/s | p50 ms | p95 ms "
             "| server p50 ms | mean batch / solo |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, run in sv["runs"].items():
        for load, r in run.items():
            if isinstance(r, dict):
                batch = (_f(r["mean_batch"]) if "mean_batch" in r
                         else f"solo {r['solo']}/{r['requests']}" if "solo" in r else "-")
                lines.append(f"| {key} | {load} | {r['requests']} | {r.get('errors', '-')} | "
                             f"{r['throughput_rps']} | {r.get('latency_p50_ms', '-')} | "
                             f"{r.get('latency_p95_ms', '-')} | {r.get('server_latency_p50_ms', '-')} "
                             f"| {batch} |")
    cost = sv.get("model_call_ms_per_image", {})
    if cost:
        by_backend = "; ".join(f"{b}: " + ", ".join(f"batch {k} {_f(v)}" for k, v in c.items())
                               for b, c in cost.items())
        lines += ["", "The model call alone (model + gate on decoded 224-px images, in one process), ms per "
                  f"image by batch size — the most batching can save on these cores: {by_backend}"]
    return [*lines, ""]


def targets(s: dict[str, Any]) -> list[str]:
    rows: list[str] = []

    def row(target: str, measured: str, met: bool) -> None:
        rows.append(f"| {target} | {measured} | {'met' if met else 'not met'} |")

    if "predict" in s:
        for backend in ("torch", "onnx"):
            full, draft = (s["predict"][f"{backend}/{m}"]["2048px-phantom"]["p95_ms"]
                           for m in ("full", "draft"))
            row(f"2048-px JPEG predict, batch-1 p95 ≤ half of full decode ({backend})",
                f"{_f(draft)} vs {_f(full)} ms ({full / draft:.2f}x)", draft <= full / 2)
    if "folder" in s:
        n = s["folder"]["folder"]["files"]
        for backend, x in s["folder"]["speedup_new_vs_old"].items():
            row(f"folder of {n} full-size films ≥ 3x today's path ({backend})", f"{x:.2f}x", x >= 3)
    if "serve" in s:
        for backend in ("torch", "onnx"):
            runs = s["serve"]["runs"]
            on, off = runs[f"{backend}/batching-on"], runs[f"{backend}/batching-off"]
            for upload in ("224px", "full-size"):
                a, b = on[f"16 clients/{upload}"], off[f"16 clients/{upload}"]
                ratio = a["throughput_rps"] / b["throughput_rps"]
                p95 = a.get("latency_p95_ms", float("nan"))
                row(f"service, 16 clients, {upload} ({backend}): batching ≥ 2x req/s at p95 ≤ 250 ms",
                    f"{ratio:.2f}x ({a['throughput_rps']} vs {b['throughput_rps']} req/s), p95 {p95} ms",
                    ratio >= 2 and p95 <= 250)
                one_on = on[f"1 client/{upload}"].get("latency_p95_ms", float("nan"))
                one_off = off[f"1 client/{upload}"].get("latency_p95_ms", float("nan"))
                row(f"service, one client, {upload} ({backend}): p95 with batching no worse",
                    f"{one_on} vs {one_off} ms", one_on <= one_off * 1.05)
    if "int8" in s:
        for model, r in s["int8"].items():
            row(f"INT8 ≥ 1.5x fp32 ONNX Runtime at batch 32 ({model})", f"{r['int8_vs_fp32']:.2f}x",
                r["int8_vs_fp32"] >= 1.5)
    if not rows:
        return []
    return ["## Targets (issue #15)", "", "| target | measured | |", "|---|---|---|", *rows,
            "", "One-client p95 counts as no worse within 5 % (run-to-run noise on a shared machine).", ""]


def gaps(s: dict[str, Any], cores_used: int = 2) -> list[str]:
    """Bounds computed from this run's own profiles: what each missed target would need, and what
    the part no lever here touches (the model + gate, the cores) allows."""
    lines: list[str] = []
    if "predict" in s:
        for backend in ("torch", "onnx"):
            full, draft = (s["predict"][f"{backend}/{m}"]["2048px-phantom"] for m in ("full", "draft"))
            if draft["p95_ms"] <= full["p95_ms"] / 2:
                continue  # met
            # The model and gate do the same work for any input: the lower p50 of the inputs is
            # the less noisy estimate of their cost.
            decode = draft["decode_p50_ms"]
            model = min(r["model_gate_p50_ms"] for r in s["predict"][f"{backend}/draft"].values())
            lines.append(
                f"- 2048-px predict ({backend}): the target needs p95 ≤ {_f(full['p95_ms'] / 2)} ms. The "
                f"draft path's median is {_f(draft['p50_ms'])} ms ({full['p50_ms'] / draft['p50_ms']:.2f}x "
                f"the full path's {_f(full['p50_ms'])} ms); its parts alone: decode {_f(decode)} + model "
                f"and gate {_f(model)} (lowest p50 of the inputs) = {_f(decode + model)} ms, and the "
                f"model and gate are {model / (decode + model):.0%} of it: no decoding lever moves them. The "
                f"p95 sits {draft['p95_ms'] / draft['p50_ms']:.2f}x above the median (the tail of one "
                "call on 2 shared cores).")
    if "folder" in s:
        f, cores = s["folder"], cores_used
        model_ms = f.get("model_call_ms_per_image_batch32", {})
        # The draft decode's cost per image, one thread: the draft-only run (no workers) less its
        # model share (decode is the same for both backends).
        draft_only = f["runs"].get("torch/draft only, no decode workers", {}).get("images_per_s")
        decode_ms = 1000 / draft_only - model_ms["torch"] if draft_only and "torch" in model_ms else None
        for backend, ms in model_ms.items():
            old = f["runs"][f"{backend}/{OLD}"]["images_per_s"]
            new = f["runs"][f"{backend}/{NEW}"]["images_per_s"]
            line = (f"- Folder ({backend}): 3x today's {_f(old)} images/s is {_f(3 * old)}; the model and "
                    f"gate alone at batch 32 take {_f(ms)} ms an image on {cores} cores, at most "
                    f"{_f(1000 / ms)} images/s even if decoding were free ({1000 / ms / old:.2f}x today's)")
            if decode_ms is not None:
                # CPU time an image needs: the model keeps all cores busy for ms, the draft decode one
                # core for decode_ms; the cores give at most cores * 1000 ms a second.
                bound = cores * 1000 / (cores * ms + decode_ms)
                line += (f"; with the draft decode's {_f(decode_ms)} core-ms an image the cores allow "
                         f"at most {_f(bound)} images/s ({bound / old:.2f}x today's), and the new path "
                         f"reaches {_f(new)} ({new / bound:.0%} of that)")
            lines.append(line + ".")
    if "serve" in s:
        sv = s["serve"]
        need = 16 / 0.25  # Little's law: 16 requests always in flight, each ≤ 250 ms on average
        for backend, cost in sv.get("model_call_ms_per_image", {}).items():
            one, big = cost["1"], min(v for k, v in cost.items() if k != "1")
            floor = sv["runs"][f"{backend}/batching-off"].get("http floor", {}).get("throughput_rps")
            http = f"; HTTP alone (no decode, no model) answers {floor} req/s" if floor else ""
            lines.append(
                f"- Service ({backend}): batching can at most turn the model's {_f(one)} ms an image at "
                f"batch 1 into {_f(big)} ms ({one / big:.2f}x, against the 2x target). By Little's law "
                f"16 clients at p95 ≤ 250 ms need about {need:.0f} req/s or more; the model and gate alone "
                f"at their best batch allow {1000 / big:.0f} req/s with nothing else on the cores{http}.")
    if not lines:
        return []
    return ["## Where the gap comes from (bounds from this run's profiles)", "", *lines, ""]


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a result")
    parser.add_argument("--out", default=str(RESULTS / "speed2-cpu"), help="result path without suffix")
    parser.add_argument("--note", default="", help="a line for the result file (e.g. the machine was loaded)")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](spec)))
        return 0
    sections = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    if not _films():
        parser.error(f"no full-size films in {FULLRES}")
    args.n_films, args.n_single, args.folder_files = 20, 200, 1000
    args.serve_requests, args.single_requests, args.n_batch, args.n_calibration = 8, 100, 7, 64
    args.int8_models = [MODEL, "resnet18"]
    if args.quick:
        args.n_films, args.n_single, args.folder_files = 3, 8, 64
        args.serve_requests, args.single_requests, args.n_batch, args.n_calibration = 2, 4, 2, 16
        args.int8_models = [MODEL]

    import importlib.metadata

    from _env import hardware, versions
    from _sections import run_sections

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    result: dict[str, Any] = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                              "hardware": hardware(), "versions": versions(), "quick": args.quick,
                              "load_average_start": round(os.getloadavg()[0], 2), "note": args.note,
                              "sections": {}, "provenance": {}}
    for pkg in ("onnxruntime", "pillow"):
        result["versions"][pkg] = importlib.metadata.version(pkg)
    runners = {"decode": section_decode, "predict": section_predict, "folder": section_folder,
               "serve": section_serve, "int8": section_int8}
    run_sections(sections, runners, args, log, result, Path(args.out), to_markdown, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
