"""Speed: PneumoScope beside the reference Keras pipeline, and where PneumoScope's time goes.

    bash scripts/setup.sh all,speed      # TensorFlow: for this benchmark only
    .venv/bin/python benchmarks/speed.py --data ../shared/data/chest_xray \
        --mnist ../shared/data/pneumoniamnist/pneumoniamnist.npz

Sections (``--only`` picks some; ``--quick`` shrinks every size for a smoke run; ``--update``
keeps the other sections of an existing result; ``--markdown-only`` recomputes the summaries):
  train    one epoch over the same training images at 224 px for ResNet50V2 and DenseNet121,
           random init on both sides, batch 32, AdamW(1e-3, wd 0.01), class weights, crop/zoom +
           small rotation + shift + brightness: (a) Keras ``ImageDataGenerator.flow_from_directory``
           + ``keras.applications`` as the reference study built it, (a') the same under Keras'
           ``mixed_bfloat16`` policy, (b) ``pneumoscope.training.train`` with its defaults.
           Alternating, ``--repeats`` times; two epochs each, so the first (cold: TensorFlow
           tracing, PneumoScope's decode-once cache) and a warm one show apart.
  infer    batch-1 latency (p50/p95) and batch-32 throughput at 224 for EfficientNet-Lite0,
           DenseNet121, ResNet50V2: PyTorch eager, PyTorch with PneumoScope's CPU settings
           (channels_last, inference_mode, the malloc settings the CLI sets), ONNX Runtime, Keras.
  predict  the path users call, checkpoint file → probability, one image per call (``Predictor``).
  levers   one training step of EfficientNet-Lite0 at 224 with each CPU lever toggled alone
           (channels_last, the malloc settings, bf16 autocast, torch.compile), and bf16 vs fp32
           for every registry architecture (what ``ModelSpec.cpu_bf16`` is set from).
  precision  ResNet50V2 trained from scratch on PneumoniaMNIST, fp32 vs bf16, same seed: does
           bf16 change what is learned (validation metrics only)?
  scale    one EfficientNet-Lite0 epoch at 128/192/224 px (all of train) and on 25/50/100% of
           train (224 px), with the share of the epoch spent fetching and augmenting batches.

Every measurement runs in a fresh subprocess: environment variables such as the malloc settings
only act from process start, and TensorFlow and PyTorch never share a process or its threads.
Writes ``benchmarks/results/speed-cpu.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
SECTIONS = ("train", "infer", "predict", "levers", "precision", "scale")
KERAS_APPS = {"resnetv2_50": "ResNet50V2", "densenet121": "DenseNet121",
              "efficientnet_lite0": None}  # keras.applications has no Lite0
MALLOC_KEYS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
SEED = 0


# --------------------------------------------------------------------------- workers
# Each runs in its own process (``speed.py --worker JSON``) and prints one JSON line.

def _keras_model(name: str, size: int) -> Any:
    import tensorflow as tf

    app = getattr(tf.keras.applications, KERAS_APPS[name])
    base = app(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    # float32 output under a mixed policy, as Keras' mixed-precision guide asks.
    out = tf.keras.layers.Dense(1, activation="sigmoid", dtype="float32")(base.output)
    return tf.keras.Model(base.input, out)


def work_train_keras(spec: dict[str, Any]) -> dict[str, Any]:
    """The reference pipeline: decode + augment per image in the generator, every epoch."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(SEED)
    if spec.get("policy"):
        # The reference study trained under a mixed policy (float16 on its GPU); on a CPU the
        # counterpart is mixed_bfloat16, measured as its own side.
        tf.keras.mixed_precision.set_global_policy(spec["policy"])
    start = time.perf_counter()
    size, batch = spec["image_size"], spec["batch_size"]
    generator = tf.keras.preprocessing.image.ImageDataGenerator(
        rescale=1 / 255, rotation_range=7, zoom_range=0.15, width_shift_range=0.04,
        height_shift_range=0.04, brightness_range=(0.8, 1.2))
    flow = generator.flow_from_directory(spec["train_dir"], target_size=(size, size),
                                         batch_size=batch, class_mode="binary", seed=SEED)
    model = _keras_model(spec["model"], size)
    model.compile(optimizer=tf.keras.optimizers.AdamW(1e-3, weight_decay=0.01),
                  loss="binary_crossentropy")
    counts = np.bincount(flow.classes, minlength=2)
    class_weight = {c: float(len(flow.classes) / (2 * counts[c])) for c in (0, 1)}
    epochs: list[float] = []

    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epochs.append(time.perf_counter() - self.t)

    setup = time.perf_counter() - start
    model.fit(flow, epochs=spec["epochs"], class_weight=class_weight, verbose=0, callbacks=[Timer()])
    # The generator alone for one more epoch: the data pipeline's own cost.
    t = time.perf_counter()
    for i in range(len(flow)):
        flow[i]
    return {"setup_s": setup, "epoch_s": epochs, "images": int(flow.samples),
            "data_only_epoch_s": time.perf_counter() - t}


def _epoch_timer() -> Any:
    """A Lightning callback timing each training epoch, the gaps between batches (fetching the
    next batch: loader + transfer) and the batch augmentation inside them."""
    import lightning as L
    from torch import nn

    class TimedAugment(nn.Module):
        def __init__(self, inner: nn.Module, sink: Any) -> None:
            super().__init__()
            self.inner, self.sink = inner, sink

        def forward(self, x: Any) -> Any:
            t = time.perf_counter()
            out = self.inner(x)
            self.sink.augment_s += time.perf_counter() - t
            return out

        def seed(self, seed: int) -> None:  # the module re-seeds augmentation every step
            self.inner.seed(seed)

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_fit_start(self, trainer: Any, module: Any) -> None:
            if module.augment is not None:
                module.augment = TimedAugment(module.augment, self)

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.t0 = self.last = time.perf_counter()
            self.gap_s = self.augment_s = self.val_s = 0.0

        # Lightning runs the validation pass inside the training epoch (before
        # on_train_epoch_end); it is not training work and the Keras side has none: excluded.
        def on_validation_start(self, trainer: Any, module: Any) -> None:
            self.val_t0 = time.perf_counter()

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            self.val_s += time.perf_counter() - self.val_t0

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            self.gap_s += time.perf_counter() - self.last

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            total = time.perf_counter() - self.t0 - self.val_s
            # Lightning calls the augmentation between fetching and on_train_batch_start.
            augment_inside_gap = min(self.augment_s, self.gap_s)
            self.rows.append({"epoch_s": total, "augment_s": self.augment_s,
                              "fetch_s": self.gap_s - augment_inside_gap, "validation_s": self.val_s})

    return EpochTimer()


def _torch_train(spec: dict[str, Any], train_records: list[Any], val_records: list[Any],
                 cache_dir: str) -> dict[str, Any]:
    """PneumoScope's training path with its defaults; only sizes and bookkeeping are set."""
    from pneumoscope.config import load_config
    from pneumoscope.data.cache import cached_images
    from pneumoscope.pipeline import train

    with tempfile.TemporaryDirectory() as out:
        config = load_config(dotted=[
            f"model.name={spec['model']}", "model.weights=none",
            f"data.image_size={spec['image_size']}", f"data.batch_size={spec['batch_size']}",
            f"train.epochs={spec['epochs']}", "train.lr=0.001", "train.patience=1000",
            f"train.seed={SEED}", "tracking.enabled=false", "eval.n_bootstrap=0",
            f"out={out}", "name=run"])
        t = time.perf_counter()
        splits = {"train": cached_images(train_records, spec["image_size"], cache_dir),
                  "val": cached_images(val_records, spec["image_size"], cache_dir)}
        data_prep = time.perf_counter() - t
        timer = _epoch_timer()
        train(config, splits=splits, progress=False, callbacks=[timer])
    return {"data_prep_s": data_prep, "epochs": timer.rows, "images": len(train_records)}


def work_train_torch(spec: dict[str, Any]) -> dict[str, Any]:
    from pneumoscope.data.records import scan_tree

    train_records = scan_tree(Path(spec["train_dir"]), "train")
    val_records = scan_tree(Path(spec["val_dir"]), "val")
    # A fresh cache per run: the first epoch pays for decoding, as on a user's first run.
    with tempfile.TemporaryDirectory() as cache:
        result = _torch_train(spec, train_records, val_records, cache)
    return {**result, "epoch_s": [r["epoch_s"] for r in result["epochs"]]}


def work_scale(spec: dict[str, Any]) -> dict[str, Any]:
    from pneumoscope.data.records import load_folder
    from pneumoscope.data.splits import subsample

    found = load_folder(spec["data"])
    train_records = found["train"]
    if spec["fraction"] < 1.0:
        train_records = subsample(train_records, spec["fraction"], SEED)
    val_records = subsample(found["train"], 64 / len(found["train"]), SEED + 1)
    return _torch_train(spec, train_records, val_records, spec["cache_dir"])


def _timed_calls(fn: Any, x: Any, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return times


def _latency_ms(times: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": 1000 * float(np.percentile(times, q)) for q in (50, 95)}


def _latency_summary(one: list[float], batch: list[float], batch_size: int) -> dict[str, float]:
    return {**_latency_ms(one), "batch_images_per_s": batch_size / statistics.median(batch)}


def work_infer(spec: dict[str, Any]) -> dict[str, Any]:
    size, backend, name = spec["image_size"], spec["backend"], spec["model"]
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (spec["batch"], size, size), dtype=np.uint8)
    if backend == "keras":
        import tensorflow as tf

        model = _keras_model(name, size)
        call = tf.function(lambda x: model(x, training=False))

        def fn(x: np.ndarray) -> np.ndarray:
            rgb = np.repeat(x[..., None].astype(np.float32) / 255.0, 3, axis=-1)
            return call(tf.constant(rgb)).numpy()
    else:
        import torch

        from pneumoscope.data.datasets import to_model_input, to_model_input_numpy
        from pneumoscope.models.factory import build_model

        model = build_model(name, "none", image_size=size, channels_last=backend == "tuned").eval()
        if backend == "onnx":
            from pneumoscope.export.onnx import INPUT_NAME, OUTPUT_NAME, export_bytes, ort_session
            from pneumoscope.models.checkpoint import CheckpointInfo

            info = CheckpointInfo(model=name, preprocessing=model.preprocessing,
                                  arch_kwargs=model.arch_kwargs)
            session = ort_session(export_bytes(model, info))

            def fn(x: np.ndarray) -> np.ndarray:
                return session.run([OUTPUT_NAME], {INPUT_NAME: to_model_input_numpy(x)})[0]
        else:
            # "eager": what a plain PyTorch script does; "tuned": PneumoScope's predict path
            # settings (channels_last model, inference_mode, malloc env from the parent).
            context = torch.inference_mode if backend == "tuned" else torch.no_grad

            def fn(x: np.ndarray) -> np.ndarray:
                with context():
                    return torch.sigmoid(model(to_model_input(x))).numpy()
    one = _timed_calls(fn, images[:1], spec["n_single"], warmup=5)
    batch = _timed_calls(fn, images, spec["n_batch"], warmup=1)
    return _latency_summary(one, batch, len(images))


def work_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """``Predictor.predict_files([path])``: decode, resize, model, threshold, one file per call."""
    from PIL import Image

    from pneumoscope.data.synthetic import make_phantom
    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model
    from pneumoscope.serve.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(spec["model"], "none", image_size=spec["image_size"])
        ckpt = save_checkpoint(Path(tmp) / "model.safetensors", model,
                               CheckpointInfo(model=spec["model"], preprocessing=model.preprocessing,
                                              arch_kwargs=model.arch_kwargs))
        out: dict[str, Any] = {}
        phantom = make_phantom(np.random.default_rng(SEED), size=spec["image_size"], pneumonia=True)
        inputs = {}
        for label, px in spec["inputs"].items():
            path = Path(tmp) / f"{label}.jpeg"
            Image.fromarray(phantom).resize((px, px), Image.Resampling.BICUBIC).save(path, quality=90)
            inputs[label] = path
        for backend in ("torch", "onnx"):
            predictor = Predictor(ckpt, backend)  # onnx: exported in memory, as `predict` does
            for label, path in inputs.items():
                times = _timed_calls(lambda p, pr=predictor: pr.predict_files([p], batch_size=1,
                                                                             progress=False),
                                     path, spec["n_single"], warmup=5)
                out[f"{backend}/{label}"] = _latency_ms(times)
    return out


def work_lever(spec: dict[str, Any]) -> dict[str, Any]:
    """Training steps of EfficientNet-Lite0 (augmentation + forward + backward + AdamW)."""
    from _steps import training_step

    size, batch = spec["image_size"], spec["batch_size"]
    step = training_step(spec.get("model", "efficientnet_lite0"), size, batch, bf16=spec["bf16"],
                         channels_last=spec["channels_last"], compile=spec["compile"], seed=SEED)

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    for _ in range(2):
        step()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"first_step_s": first, "step_s": statistics.median(times),
            "images_per_s": batch / statistics.median(times)}


def work_precision(spec: dict[str, Any]) -> dict[str, Any]:
    """A short from-scratch training run through ``train``; its validation metrics."""
    from pneumoscope.config import load_config
    from pneumoscope.pipeline import train

    with tempfile.TemporaryDirectory() as out:
        config = load_config(dotted=[
            f"data.root={spec['data']}", f"model.name={spec['model']}", "model.weights=none",
            f"data.image_size={spec['image_size']}", f"train.epochs={spec['epochs']}",
            f"train.precision={spec['precision']}", f"train.seed={SEED}",
            "tracking.enabled=false", "eval.n_bootstrap=0", f"out={out}", "name=run"])
        timer = _epoch_timer()
        result = train(config, splits=None, progress=False, callbacks=[timer])
    val = result.summary.val.at_threshold.metrics
    return {"epoch_s": [r["epoch_s"] for r in timer.rows], "wall_time_s": result.wall_time_s,
            "val_auc": val["auc"], "val_log_loss": val["log_loss"], "val_accuracy": val["accuracy"]}


WORKERS = {"train_keras": work_train_keras, "train_torch": work_train_torch, "scale": work_scale,
           "infer": work_infer, "predict": work_predict, "lever": work_lever,
           "precision": work_precision}


# --------------------------------------------------------------------------- orchestration

def _env(fast_malloc: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEYS}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    if fast_malloc:
        from pneumoscope.runtime import FAST_MALLOC_ENV

        env.update(FAST_MALLOC_ENV)
    return env


def run_worker(kind: str, spec: dict[str, Any], *, fast_malloc: bool, log: Any) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    payload = json.dumps({"kind": kind, **spec})
    label = " ".join(f"{k}={v}" for k, v in spec.items() if k in
                     ("model", "backend", "image_size", "fraction", "lever", "side"))
    log(f"  {kind} {label} (malloc env {'on' if fast_malloc else 'off'}) ...")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", payload], env=_env(fast_malloc),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {label} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"    done in {time.perf_counter() - t:.0f} s")
    return result


def make_subset(data: Path, dest: Path, n_train: int, n_val: int) -> dict[str, str]:
    """Copy a fixed, stratified sample of ``data/train`` into ``dest/{train,val}/CLASS``:
    the same files for both pipelines (val only feeds PneumoScope's per-epoch validation)."""
    rng = random.Random(SEED)
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((data / "train" / cls).iterdir())
        rng.shuffle(files)
        # The train pool's class mix (about 26% NORMAL).
        share = 0.26 if cls == "NORMAL" else 0.74
        k_train, k_val = round(n_train * share), max(2, round(n_val * share))
        for split, chosen in (("train", files[:k_train]), ("val", files[k_train:k_train + k_val])):
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy2(f, dest / split / cls / f.name)
    return {"train_dir": str(dest / "train"), "val_dir": str(dest / "val")}


def summarize_train(sides: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per side: the best (fastest) warm and first epoch over the runs, and the median; and the
    speed-up as the median of the per-repeat ratios with their range (the headline: Keras' second
    epoch varied up to 2x between otherwise identical runs), best-of-runs beside it."""
    row: dict[str, Any] = {}
    for side, results in sides.items():
        images = results[0]["images"]
        warm_all = [r["epoch_s"][-1] for r in results]
        first_all = [r["epoch_s"][0] + r.get("data_prep_s", 0.0) + r.get("setup_s", 0.0) for r in results]
        warm = min(warm_all)
        row[side] = {"images": images, "warm_epoch_s": warm, "warm_images_per_s": images / warm,
                     "warm_epoch_median_s": statistics.median(warm_all),
                     "first_epoch_incl_setup_s": min(first_all), "runs": results}
        if side != "pneumoscope":
            row[side]["data_only_epoch_s"] = statistics.median(r["data_only_epoch_s"] for r in results)
        else:
            fetch = statistics.median(r["epochs"][-1]["fetch_s"] + r["epochs"][-1]["augment_s"]
                                      for r in results)
            row[side]["data_share_warm"] = fetch / statistics.median(warm_all)
    ours = row["pneumoscope"]
    # The headline (issue #15): the median of the per-repeat ratios (repeat i of each side ran
    # back to back), with their range; best-of-runs beside it.
    paired = [k["epoch_s"][-1] / p["epoch_s"][-1] for k, p in zip(sides["keras"], sides["pneumoscope"],
                                                                   strict=True)]
    row["speedup_warm_paired"] = paired
    row["speedup_warm_median_ratio"] = statistics.median(paired)
    row["speedup_warm"] = row["keras"]["warm_epoch_s"] / ours["warm_epoch_s"]
    row["speedup_warm_median"] = row["keras"]["warm_epoch_median_s"] / ours["warm_epoch_median_s"]
    row["speedup_first"] = row["keras"]["first_epoch_incl_setup_s"] / ours["first_epoch_incl_setup_s"]
    row["speedup_warm_vs_keras_bf16"] = row["keras_bf16"]["warm_epoch_s"] / ours["warm_epoch_s"]
    return row


def section_train(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_subset(Path(args.data), Path(tmp), args.train_images, 64)
        base = {"image_size": 224, "batch_size": 32, "epochs": 2, **dirs}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for rep in range(args.repeats):
            for model in args.train_models:
                # Alternate which side goes first, so drift in machine load hits both.
                sides = ("keras", "keras_bf16", "pneumoscope")
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    kind = "train_torch" if side == "pneumoscope" else "train_keras"
                    policy = {"keras_bf16": "mixed_bfloat16"}.get(side)
                    result = run_worker(kind, {**base, "model": model, "side": side, "policy": policy},
                                        fast_malloc=side == "pneumoscope", log=log)
                    runs.setdefault(model, {}).setdefault(side, []).append(result)
    summary = {model: summarize_train(sides) for model, sides in runs.items()}
    return {"setup": {**{k: v for k, v in base.items() if not k.endswith("_dir")},
                      "train_images": args.train_images, "repeats": args.repeats}, "models": summary}


def section_infer(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in args.infer_models:
        row = {}
        backends = ["eager", "tuned", "onnx"] + (["keras"] if KERAS_APPS[model] else [])
        for backend in backends:
            row[backend] = run_worker("infer", {"model": model, "backend": backend, "image_size": 224,
                                                "batch": 32, "n_single": args.n_single,
                                                "n_batch": args.n_batch},
                                      fast_malloc=backend in ("tuned", "onnx"), log=log)
        row["onnx_vs_eager_batch"] = row["onnx"]["batch_images_per_s"] / row["eager"]["batch_images_per_s"]
        row["onnx_vs_eager_p50"] = row["eager"]["p50_ms"] / row["onnx"]["p50_ms"]
        row["tuned_vs_eager_batch"] = row["tuned"]["batch_images_per_s"] / row["eager"]["batch_images_per_s"]
        if "keras" in row:
            row["tuned_vs_keras_batch"] = (row["tuned"]["batch_images_per_s"]
                                           / row["keras"]["batch_images_per_s"])
        out[model] = row
    return out


def section_predict(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    spec = {"model": "efficientnet_lite0", "image_size": 224, "n_single": args.n_single,
            "inputs": {"224px-jpeg": 224, "2048px-jpeg": 2048}}
    return run_worker("predict", spec, fast_malloc=True, log=log)


LEVERS = {  # name: (worker spec changes, malloc env on)
    "default": ({}, True),
    "no channels_last": ({"channels_last": False}, True),
    "no malloc settings": ({}, False),
    "bf16 autocast": ({"bf16": True}, True),
    "torch.compile": ({"compile": True}, True),
}


def section_levers(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from pneumoscope.models.registry import list_specs
    from pneumoscope.training.train import cpu_supports_bf16

    base = {"image_size": 224, "batch_size": 32, "steps": args.lever_steps, "channels_last": True,
            "bf16": False, "compile": False}
    out: dict[str, Any] = {"efficientnet_lite0": {
        name: run_worker("lever", {**base, **changes, "lever": name.replace(" ", "_")},
                         fast_malloc=malloc, log=log)
        for name, (changes, malloc) in LEVERS.items()}}
    for row in out["efficientnet_lite0"].values():
        row["vs_default"] = row["images_per_s"] / out["efficientnet_lite0"]["default"]["images_per_s"]
    # bf16 autocast per registry architecture: what ModelSpec.cpu_bf16 is set from.
    out["cpu_supports_bf16"] = cpu_supports_bf16()
    out["bf16_by_model"] = {}
    small = {**base, "batch_size": 16, "steps": max(1, args.lever_steps // 2)}
    for spec in list_specs():
        if args.quick and spec.name not in ("efficientnet_lite0", "resnet18"):
            continue
        fp32, bf16 = (run_worker("lever", {**small, "model": spec.name, "bf16": b, "lever": f"bf16={b}"},
                                 fast_malloc=True, log=log) for b in (False, True))
        out["bf16_by_model"][spec.name] = {
            "fp32_images_per_s": fp32["images_per_s"], "bf16_images_per_s": bf16["images_per_s"],
            "bf16_speedup": bf16["images_per_s"] / fp32["images_per_s"], "registry_cpu_bf16": spec.cpu_bf16}
    return out


def section_precision(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Does bf16 autocast change what training learns? Same seed, same data, fp32 vs bf16."""
    out = {}
    for model in args.precision_models:
        out[model] = {p: run_worker("precision", {"model": model, "data": args.mnist, "image_size": 64,
                                                  "epochs": args.precision_epochs, "precision": p},
                                    fast_malloc=True, log=log)
                      for p in ("32-true", "bf16-mixed")}
    return out


def section_scale(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from pneumoscope.data.cache import cached_images
    from pneumoscope.data.records import load_folder
    from pneumoscope.data.splits import subsample

    found = load_folder(args.data)
    points = [(size, 1.0) for size in args.scale_sizes] + \
             [(224, f) for f in args.scale_fractions if f < 1.0]
    out: dict[str, Any] = {"points": []}
    with tempfile.TemporaryDirectory() as cache:
        # Decode once per size, outside the timed epochs (timed here as the cache build).
        out["cache_build_s"] = {}
        for size in sorted({s for s, _ in points}):
            t = time.perf_counter()
            records = found["train"]
            cached_images(records, size, cache)
            cached_images(subsample(records, 64 / len(records), SEED + 1), size, cache)
            for f in {f for s, f in points if s == size and f < 1.0}:
                cached_images(subsample(records, f, SEED), size, cache)
            out["cache_build_s"][str(size)] = time.perf_counter() - t
            log(f"  cache at {size} px built in {out['cache_build_s'][str(size)]:.0f} s")
        for size, fraction in points:
            spec = {"model": "efficientnet_lite0", "image_size": size, "batch_size": 32,
                    "epochs": 1, "fraction": fraction, "data": args.data, "cache_dir": cache}
            r = run_worker("scale", spec, fast_malloc=True, log=log)
            epoch = r["epochs"][0]
            out["points"].append({"image_size": size, "fraction": fraction, "images": r["images"],
                                  "epoch_s": epoch["epoch_s"],
                                  "us_per_image_pixel": 1e6 * epoch["epoch_s"] / (r["images"] * size * size),
                                  "fetch_share": epoch["fetch_s"] / epoch["epoch_s"],
                                  "augment_share": epoch["augment_s"] / epoch["epoch_s"]})
    return out


# --------------------------------------------------------------------------- report

def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def _registry_bf16(name: str) -> str:
    from pneumoscope.models.registry import get_spec

    try:
        return str(get_spec(name).cpu_bf16)
    except KeyError:
        return "not registered"


def targets_table(s: dict[str, Any]) -> list[str]:
    """The issue's targets beside what this run measured (sections that ran only)."""
    rows = []

    def row(target: str, measured: str, met: bool | None) -> None:
        verdict = "(no target)" if met is None else "met" if met else "**missed**"
        rows.append(f"| {target} | {measured} | {verdict} |")

    if "train" in s:
        for model, r in s["train"]["models"].items():
            if "speedup_warm_median_ratio" in r:  # results from before it: best-of-runs
                paired = r["speedup_warm_paired"]
                row(f"training epoch ≥ 2x the Keras reference ({model}), median of {len(paired)} "
                    "paired runs", f"{r['speedup_warm_median_ratio']:.2f}x warm (range "
                    f"{min(paired):.2f}–{max(paired):.2f}x; best-of-runs {r['speedup_warm']:.2f}x), "
                    f"{r['speedup_first']:.2f}x first epoch ({r['speedup_warm_vs_keras_bf16']:.2f}x "
                    "vs Keras mixed_bfloat16, best-of-runs)", r["speedup_warm_median_ratio"] >= 2)
                continue
            row(f"training epoch ≥ 2x the Keras reference ({model})",
                f"{r['speedup_warm']:.2f}x warm, {r['speedup_first']:.2f}x first epoch "
                f"({r['speedup_warm_vs_keras_bf16']:.2f}x vs Keras mixed_bfloat16)",
                r["speedup_warm"] >= 2)
    if "predict" in s:
        p95 = s["predict"]["torch/224px-jpeg"]["p95_ms"]
        row("Lite0 predict path, batch-1 p95 ≤ 50 ms (224-px JPEG, torch backend)",
            f"{p95:.1f} ms", p95 <= 50)
        big = s["predict"]["torch/2048px-jpeg"]["p95_ms"]
        row("for scale: the same with a 2048-px JPEG, as a full-size film arrives", f"{big:.1f} ms", None)
    if "infer" in s and "efficientnet_lite0" in s["infer"]:
        r = s["infer"]["efficientnet_lite0"]
        row("ONNX Runtime ≥ 1.2x PyTorch eager (Lite0)",
            f"{r['onnx_vs_eager_batch']:.2f}x batch 32, {r['onnx_vs_eager_p50']:.2f}x batch-1 p50",
            min(r["onnx_vs_eager_batch"], r["onnx_vs_eager_p50"]) >= 1.2)
    shares = []
    if "scale" in s:
        shares += [p["fetch_share"] + p["augment_share"] for p in s["scale"]["points"]]
    if "train" in s:
        shares += [r["pneumoscope"]["data_share_warm"] for r in s["train"]["models"].values()]
    if shares:
        row("data loading < 10% of an epoch after the first (fetch + augmentation)",
            f"at most {100 * max(shares):.1f}%", max(shares) < 0.10)
    if not rows:
        return []
    return ["## Targets", "", "| target | measured | |", "|---|---|---|", *rows, ""]


def to_markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = ["# Speed: PneumoScope beside the reference Keras pipeline", "",
             f"Command: `{result['command']}`  ",
             f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores, GPU: {hw['gpu'] or 'none'}; "
             f"load average at start {hw['load_average_1m']}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
             f"Wall time: {result['wall_time_s'] / 60:.1f} min", ""]
    s = result["sections"]
    earlier = "the earlier run at " + ", ".join(
        r["versions"].get("git_commit", "?") for r in result.get("earlier_runs", []))
    if result.get("earlier_runs"):
        lines += ["Sections were measured by different invocations (`--update`); each section's "
                  "command and commit are in the JSON: " + ", ".join(
                      f"{k} at {result.get('provenance', {}).get(k, {}).get('git_commit') or earlier}"
                      for k in s), ""]
    lines += targets_table(s)
    if "train" in s:
        t = s["train"]
        setup = t["setup"]
        lines += ["## Training: one epoch, same images, Keras reference vs PneumoScope default", "",
                  f"{setup['train_images']} training images (stratified sample of train), "
                  f"{setup['image_size']} px, batch {setup['batch_size']}, random init, AdamW, "
                  f"class weights, augmentation on both sides; {setup['repeats']} alternating runs "
                  "of 2 epochs per side. Warm = the second epoch; first = setup + data "
                  "preparation + first epoch; each the best of the runs (Keras' warm epoch varied "
                  "up to 2x between identical runs; every run is in the JSON). Lightning's "
                  "validation pass inside the epoch is not counted (Keras runs none).", "",
                  "| model | Keras warm epoch (img/s) | Keras mixed_bfloat16 warm epoch (img/s) "
                  "| PneumoScope warm epoch (img/s) | speed-up vs Keras | vs Keras bf16 "
                  "| speed-up, first epoch | Keras data pipeline alone | PneumoScope data share |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for model, row in t["models"].items():
            k, kb, p = row["keras"], row["keras_bf16"], row["pneumoscope"]
            if "speedup_warm_median_ratio" in row:
                paired = row["speedup_warm_paired"]
                speedup = (f"**{row['speedup_warm_median_ratio']:.2f}x** median of paired runs (range "
                           f"{min(paired):.2f}–{max(paired):.2f}x; best-of-runs {row['speedup_warm']:.2f}x)")
            else:  # results from before the paired median
                speedup = f"**{row['speedup_warm']:.2f}x** (median {row['speedup_warm_median']:.2f}x)"
            lines.append(
                f"| {model} | {_fmt(k['warm_epoch_s'])} s ({_fmt(k['warm_images_per_s'], 2)}) "
                f"| {_fmt(kb['warm_epoch_s'])} s ({_fmt(kb['warm_images_per_s'], 2)}) "
                f"| {_fmt(p['warm_epoch_s'])} s ({_fmt(p['warm_images_per_s'], 2)}) | {speedup} "
                f"| {row['speedup_warm_vs_keras_bf16']:.2f}x "
                f"| {row['speedup_first']:.2f}x | {_fmt(k['data_only_epoch_s'])} s "
                f"({100 * k['data_only_epoch_s'] / k['warm_epoch_s']:.0f}% of its epoch) "
                f"| {100 * p['data_share_warm']:.1f}% |")
        lines.append("")
    if "infer" in s:
        lines += ["## Inference at 224 px (random-init weights; speed does not depend on them)", "",
                  "| model | backend | batch-1 p50 (ms) | batch-1 p95 (ms) | batch-32 img/s |",
                  "|---|---|---|---|---|"]
        for model, row in s["infer"].items():
            for backend in ("eager", "tuned", "onnx", "keras"):
                if backend in row:
                    r = row[backend]
                    lines.append(f"| {model} | {backend} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} "
                                 f"| {_fmt(r['batch_images_per_s'])} |")
        lines += ["", "eager: plain PyTorch (no_grad, NCHW, default malloc); tuned: PneumoScope's "
                  "settings (channels_last, inference_mode, malloc env); onnx: ONNX Runtime via "
                  "`pneumoscope export`'s graph; keras: `keras.applications` model in a tf.function.", ""]
        lines += ["| model | ONNX vs eager (batch 32) | ONNX vs eager (batch-1 p50) | tuned vs eager "
                  "(batch 32) | tuned PyTorch vs Keras (batch 32) |", "|---|---|---|---|---|"]
        for model, row in s["infer"].items():
            keras = f"{row['tuned_vs_keras_batch']:.2f}x" if "tuned_vs_keras_batch" in row else "n/a"
            lines.append(f"| {model} | {row['onnx_vs_eager_batch']:.2f}x | {row['onnx_vs_eager_p50']:.2f}x "
                         f"| {row['tuned_vs_eager_batch']:.2f}x | {keras} |")
        lines.append("")
    if "predict" in s:
        lines += ["## Predict path (checkpoint file → probability, one image per call)", "",
                  "| backend / input | p50 (ms) | p95 (ms) |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['p50_ms'])} | {_fmt(v['p95_ms'])} |" for k, v in s["predict"].items()]
        lines.append("")
    if "levers" in s:
        lv = s["levers"]
        lines += ["## Training-step levers (EfficientNet-Lite0, 224 px, batch 32)", "",
                  "| setting | img/s | vs default | first step (s) |", "|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['images_per_s'], 2)} | {v['vs_default']:.2f}x "
                  f"| {_fmt(v['first_step_s'])} |" for k, v in lv["efficientnet_lite0"].items()]
        lines += ["", f"bf16 autocast per architecture (224 px, batch 16; CPU has native bf16: "
                  f"{lv['cpu_supports_bf16']}). `ModelSpec.cpu_bf16` turns it on by default where "
                  "it is faster.", "",
                  "| model | fp32 img/s | bf16 img/s | bf16 speed-up | `cpu_bf16` in the registry now |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['fp32_images_per_s'], 2)} | {_fmt(v['bf16_images_per_s'], 2)} "
                  f"| {v['bf16_speedup']:.2f}x | {_registry_bf16(k)} |"
                  for k, v in lv["bf16_by_model"].items()]
        lines.append("")
    if "precision" in s:
        lines += ["## Does bf16 change what is learned? "
                  "(PneumoniaMNIST at 64 px, from scratch, same seed)", "",
                  "| model | precision | epoch (s) | val AUC | val log loss | val accuracy |",
                  "|---|---|---|---|---|---|"]
        for model, row in s["precision"].items():
            lines += [f"| {model} | {p} | {_fmt(statistics.median(r['epoch_s']))} | {r['val_auc']:.4f} "
                      f"| {r['val_log_loss']:.4f} | {r['val_accuracy']:.4f} |" for p, r in row.items()]
        lines.append("")
    if "scale" in s:
        sc = s["scale"]
        lines += ["## Scaling (EfficientNet-Lite0, one epoch, decode-once cache already built)", "",
                  "Cache build (decode + resize all train images once): " +
                  ", ".join(f"{k} px {v:.0f} s" for k, v in sc["cache_build_s"].items()), "",
                  "| image size | share of train | images | epoch (s) | µs per image-pixel | fetch share "
                  "| augment share |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['image_size']} | {p['fraction']:.0%} | {p['images']} | {_fmt(p['epoch_s'])} "
                  f"| {p['us_per_image_pixel']:.3f} | {100 * p['fetch_share']:.1f}% "
                  f"| {100 * p['augment_share']:.1f}% |" for p in sc["points"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help="a Kermany-layout folder (train/NORMAL, train/PNEUMONIA)")
    parser.add_argument("--mnist", help="pneumoniamnist.npz, for the precision section")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a result")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "speed-cpu"), help="result path without suffix")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sections of an existing OUT.json, replace the ones run")
    parser.add_argument("--markdown-only", action="store_true",
                        help="recompute the summaries from the raw runs in OUT.json, rewrite OUT.json/.md")
    args = parser.parse_args(argv)
    if args.markdown_only:
        out = Path(args.out)
        result = json.loads(out.with_suffix(".json").read_text())
        if "train" in result["sections"]:  # summaries are recomputed from the stored raw runs
            models = result["sections"]["train"]["models"]
            for model, row in models.items():
                models[model] = summarize_train({side: row[side]["runs"] for side in
                                                 ("keras", "keras_bf16", "pneumoscope")})
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(result) + "\n")
        return 0
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](spec)))
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    if {"train", "scale"} & set(sections) and not (args.data and (Path(args.data) / "train").is_dir()):
        parser.error("--data must be a folder with train/NORMAL and train/PNEUMONIA "
                     "(e.g. ../shared/data/chest_xray)")
    if "precision" in sections and not (args.mnist and Path(args.mnist).is_file()):
        parser.error("the precision section needs --mnist PATH/pneumoniamnist.npz")
    args.train_models = ["resnetv2_50", "densenet121"]
    args.precision_models, args.precision_epochs = ["resnetv2_50"], 2
    args.infer_models = ["efficientnet_lite0", "densenet121", "resnetv2_50"]
    args.n_single, args.n_batch, args.lever_steps = 50, 5, 6
    args.scale_sizes, args.scale_fractions = [128, 192, 224], [0.25, 0.5, 1.0]
    if args.quick:
        args.repeats, args.train_images = 1, 64
        args.n_single, args.n_batch, args.lever_steps = 10, 2, 2
        args.infer_models = ["efficientnet_lite0", "resnetv2_50"]
        args.scale_sizes, args.scale_fractions = [128], [0.05]
        args.precision_epochs = 1

    from _env import hardware, versions
    from _sections import run_sections

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "hardware": hardware(), "versions": versions(), "quick": args.quick, "sections": {}}
    for pkg in ("tensorflow-cpu", "keras", "onnxruntime"):
        try:
            result["versions"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            result["versions"][pkg] = "not installed"
    out = Path(args.out)
    if args.update and out.with_suffix(".json").is_file():
        previous = json.loads(out.with_suffix(".json").read_text())
        result["sections"] = previous["sections"]
        result["provenance"] = previous.get("provenance", {})
        # What each section was measured with stays on record beside it.
        result["earlier_runs"] = [*previous.get("earlier_runs", []),
                                  {k: previous[k] for k in ("command", "hardware", "versions", "wall_time_s")
                                   if k in previous}]
    runners = {"train": section_train, "infer": section_infer, "predict": section_predict,
               "levers": section_levers, "precision": section_precision, "scale": section_scale}
    run_sections(sections, runners, args, log, result, out, to_markdown, start,
                 provenance={"command": result["command"],
                             "git_commit": result["versions"].get("git_commit")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
