"""Agreement, not speed: INT8 parity on trained models, and what draft decoding does to a trained
model's answers on full-size films.

    python benchmarks/int8_parity.py            # the saved result (trained quick-compare models)
    python benchmarks/int8_parity.py --quick    # smoke run: synthetic films, random model

Sections (``--only`` picks some):
  int8   for each ``--models`` file (copied to a temporary folder): the fp32 ONNX export
         (``export.onnx.export_onnx``, its PyTorch parity check) and the INT8 export
         (``export.quantize.export_int8``: calibrated and checked on the model's own
         validation split, rebuilt from the split fields saved in the model file, decoded
         alone: no test image is read) under each of :data:`OPTIONS`: validation AUC fp32 vs
         INT8, label agreement at the model's threshold, max |p difference|, and whether the
         rule (AUC within 0.003, >= 99.5 % of the labels) wrote the file or refused it.
  draft  the first model, torch backend, through ``Predictor.predict_files`` as ``predict``
         runs it: draft decoding (the default) vs ``--full-decode``, on the full-size films of
         ``--films`` (labels from the NORMAL/PNEUMONIA folder names) and on each film
         re-encoded at :data:`REENCODE` long sides (a temporary folder, deleted at the end):
         |p_draft - p_full| per image, label and gate agreement, AUC both ways.

Nothing here times anything, so it may run on a loaded machine. Writes
``benchmarks/results/int8-parity-cpu.{json,md}`` (``--out`` to change).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed2 import FULLRES, SHARED, _reencode  # noqa: E402

RESULTS = HERE / "results"
SECTIONS = ("int8", "draft")
QUICK_COMPARE = HERE.parent / "runs" / "bench" / "quick-compare"
MODELS = [QUICK_COMPARE / "efficientnet_lite0" / "model.safetensors",
          QUICK_COMPARE / "resnet18" / "model.safetensors"]
OPTIONS: dict[str, dict[str, Any]] = {
    # name: Int8Rule fields besides the rule itself ("all" calibration images: the whole split)
    "default (uint8 activations, 256 calibration films)": {},
    "int8-symmetric activations": {"activations": "int8-symmetric"},
    "int8-symmetric activations, every validation film calibrates": {"activations": "int8-symmetric",
                                                                     "calibration_images": "all"},
}
REENCODE = ((1024, 92), (2048, 90), (3000, 95))
"""(long side in px, JPEG quality) of the re-encoded copies."""

log = logging.getLogger("int8_parity")


# --------------------------------------------------------------------------- pure summaries

def agreement(p_a: Sequence[float], p_b: Sequence[float], labels: Sequence[int],
              threshold: float) -> dict[str, Any]:
    """How close two sets of probabilities for the same labelled images are: max / mean
    |difference|, the share of equal labels at ``threshold``, and the AUC of each."""
    from pneumoscope.evaluation.metrics import binary_metrics

    a, b, y = (np.asarray(v, dtype=np.float64) for v in (p_a, p_b, labels))
    if not len(a) or a.shape != b.shape or a.shape != y.shape:
        raise ValueError(f"expected equal, non-empty lengths, got {a.shape}, {b.shape}, {y.shape}")
    diff = np.abs(a - b)
    return {"n": len(a), "n_positive": int(y.sum()), "max_abs_prob_diff": float(diff.max()),
            "mean_abs_prob_diff": float(diff.mean()),
            "label_agreement": float(np.mean((a >= threshold) == (b >= threshold))),
            "auc_a": binary_metrics(y, a, threshold)["auc"], "auc_b": binary_metrics(y, b, threshold)["auc"]}


# --------------------------------------------------------------------------- int8

def validation_split(model_file: Path, data: Path) -> tuple[Any, Any, str]:
    """The model's info, its validation split of ``data`` (only that split decoded) and how it
    was rebuilt."""
    from pneumoscope.config import checkpoint_data_config
    from pneumoscope.data.datasets import load_splits
    from pneumoscope.models.checkpoint import read_info

    info = read_info(model_file)
    config = checkpoint_data_config(info.config, data, info.preprocessing.image_size)
    val = load_splits(config.data, config.split_seed, only=("val",))["val"]
    assert not any(r.split == "test" for r in val.records), "a test film in the validation split"
    how = (f"load_splits(root={data}, val_fraction={config.data.val_fraction}, subset={config.data.subset}, "
           f"split seed {config.split_seed}, only=('val',)) at {info.preprocessing.image_size} px")
    return info, val, how


def int8_model(model_file: Path, data: Path, options: dict[str, dict[str, Any]], tmp: Path) -> dict[str, Any]:
    from pneumoscope.export.onnx import export_onnx, read_onnx_metadata
    from pneumoscope.export.quantize import Int8ParityError, Int8Rule, export_int8

    ckpt = tmp / model_file.name
    shutil.copyfile(model_file, ckpt)
    info, val, how = validation_split(ckpt, data)
    images, labels = np.asarray(val.images), val.labels
    fp32 = export_onnx(ckpt, tmp / "model.onnx", check=True)
    out: dict[str, Any] = {
        "model_file": str(model_file), "model": info.model, "image_size": info.preprocessing.image_size,
        "threshold": info.threshold, "validation": {"n": len(labels), "n_positive": int(labels.sum()),
                                                    "rebuilt_with": how},
        # The AUC the training run recorded on its validation split: the fp32 AUC here must match
        # it, or this is not the model's validation split.
        "recorded_val_auc": (info.metrics.get("val") or {}).get("auc"),
        "fp32_onnx_vs_torch_max_abs_diff":
            json.loads(Path(f"{fp32}.json").read_text())["parity"]["max_abs_diff"],
        "options": {}}
    for i, (name, fields) in enumerate(options.items()):
        if fields.get("calibration_images") == "all":
            fields = {**fields, "calibration_images": len(images)}
        log.info("  %s: INT8, %s ...", info.model, name)
        target = tmp / f"option{i}.int8.onnx"
        try:
            export_int8(ckpt, images, labels, target, rule=Int8Rule(**fields))
            record, written = json.loads(Path(f"{target}.json").read_text())["quantization"], True
            assert read_onnx_metadata(target)["quantization"]
        except Int8ParityError as exc:
            record, written = exc.record, False
        out["options"][name] = {**record, "written": written}
    return out


def section_int8(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for model_file in args.models:
        with tempfile.TemporaryDirectory(prefix="int8-parity-") as tmp:
            result = int8_model(Path(model_file), Path(args.data), args.options, Path(tmp))
        out[result["model"]] = result
    return out


# --------------------------------------------------------------------------- draft

def _predict(model_file: Path, paths: list[Path], draft: bool) -> dict[str, Any]:
    """Probabilities (gate off: every film gets one), gate verdicts (gate on) and model inputs."""
    from pneumoscope.serve.predict import Predictor

    plain = Predictor(model_file, "torch", draft=draft, gate=False)
    gated = Predictor(model_file, "torch", draft=draft)
    rows = gated.predict_files(paths, progress=False)
    return {"prob": [r.prob_pneumonia for r in plain.predict_files(paths, progress=False)],
            "gate": [r.gate for r in rows], "inputs": [plain.decode_bytes(p).gray for p in paths],
            "threshold": plain.threshold, "gate_state": gated.gate.state}


def section_draft(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from pneumoscope.data.records import scan_tree

    model_file = Path(args.models[0])
    films = scan_tree(args.films)
    if not films:
        raise FileNotFoundError(f"no films under {args.films}/{{NORMAL,PNEUMONIA}}")
    with tempfile.TemporaryDirectory(prefix="int8-parity-draft-") as tmp:
        ckpt = Path(tmp) / model_file.name
        shutil.copyfile(model_file, ckpt)
        images = [("original files", Path(r.path), r.label) for r in films]
        for side, quality in REENCODE:
            folder = Path(tmp) / f"{side}px"
            folder.mkdir()
            for r in films:
                copy = folder / Path(r.path).name
                copy.write_bytes(_reencode(Path(r.path), side, quality))
                images.append((f"re-encoded, long side {side} px, quality {quality}", copy, r.label))
        paths = [path for _, path, _ in images]
        log.info("  predicting %d films, draft and full decode ...", len(paths))
        draft, full = _predict(ckpt, paths, True), _predict(ckpt, paths, False)
        sizes = []
        for path in paths:
            with Image.open(path) as img:
                sizes.append(list(img.size))
    rows = []
    for i, (group, path, label) in enumerate(images):
        pixels = np.abs(draft["inputs"][i].astype(int) - full["inputs"][i].astype(int))
        rows.append({"file": path.name, "set": group, "size": sizes[i], "label": label,
                     "p_draft": draft["prob"][i], "p_full": full["prob"][i],
                     "abs_diff": abs(draft["prob"][i] - full["prob"][i]),
                     "gate_draft": draft["gate"][i], "gate_full": full["gate"][i],
                     "input_max_pixel_diff": int(pixels.max()),
                     "input_mean_pixel_diff": float(pixels.mean())})
    summary = {}
    for name in [*dict.fromkeys(group for group, _, _ in images), "all"]:
        chosen = [r for r in rows if name in ("all", r["set"])]
        g = agreement([r["p_draft"] for r in chosen], [r["p_full"] for r in chosen],
                      [r["label"] for r in chosen], draft["threshold"])
        g["auc_draft"], g["auc_full"] = g.pop("auc_a"), g.pop("auc_b")
        g["gate_agreement"] = float(np.mean([r["gate_draft"] == r["gate_full"] for r in chosen]))
        g["input_max_pixel_diff"] = max(r["input_max_pixel_diff"] for r in chosen)
        g["input_mean_pixel_diff"] = float(np.mean([r["input_mean_pixel_diff"] for r in chosen]))
        summary[name] = g
    return {"model_file": str(model_file), "films": str(args.films), "threshold": draft["threshold"],
            "gate": draft["gate_state"],
            "films_in_model_splits": split_membership(model_file, films, args.data),
            "summary": summary, "images": rows}


def split_membership(model_file: Path, films: Sequence[Any], data: str) -> dict[str, int]:
    """How many ``films`` share a file name with the model's training / validation split of
    ``data`` (file names only: no image of any split is decoded)."""
    from pneumoscope.config import checkpoint_data_config
    from pneumoscope.data.records import load_folder
    from pneumoscope.data.splits import make_splits
    from pneumoscope.models.checkpoint import read_info

    info = read_info(model_file)
    config = checkpoint_data_config(info.config, data, info.preprocessing.image_size)
    splits = make_splits(load_folder(data), config.data.val_fraction, config.split_seed)
    return {name: sum(Path(f.path).name in {Path(r.path).name for r in splits[name]} for f in films)
            for name in ("train", "val")}


# --------------------------------------------------------------------------- report

def _f(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def to_markdown(r: dict[str, Any]) -> str:
    hw = r["hardware"]
    lines = ["# INT8 parity on trained models; draft decoding's effect on a trained model", "",
             f"Command: `{r['command']}`  ",
             f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores, GPU: {hw['gpu'] or 'none'}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + "  ",
             f"Wall time: {r.get('wall_time_s', 0) / 60:.1f} min" + (" (--quick: a smoke run, not a result)"
                                                                     if r["quick"] else ""), ""]
    s = r["sections"]
    if "int8" in s:
        lines += ["## INT8 ONNX parity on the model's validation split", "",
                  "`export_int8` (static QDQ, int8 per-channel weights, MinMax calibration on evenly "
                  "spread validation films) run beside the fp32 ONNX model on every validation film; "
                  "the rule writes the INT8 file only if |ΔAUC| ≤ 0.003 and ≥ 99.5 % of the labels "
                  "(at the model's threshold) agree. No test film is read.", "",
                  "| model | option | val n | AUC fp32 | AUC int8 | ΔAUC | labels agree | label flips "
                  "(fp32 p within … of the threshold) | max abs Δp | rule |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in s["int8"].values():
            for name, o in m["options"].items():
                lines.append(f"| {m['model']} ({m['image_size']} px) | {name} | {o['n_images']} | "
                             f"{_f(o['auc_fp32'])} | {_f(o['auc_int8'])} | {o['auc_difference']:+.4f} | "
                             f"{100 * o['label_agreement']:.2f} % | {o['flipped']} "
                             f"({_f(o['flipped_max_fp32_distance'], 3)}) | {_f(o['max_abs_prob_diff'], 3)} | "
                             f"{'written' if o['written'] else '**refused**'} |")
        lines.append("")
        for m in s["int8"].values():
            lines.append(f"- {m['model']}: validation {m['validation']['n']} films "
                         f"({m['validation']['n_positive']} pneumonia), {m['validation']['rebuilt_with']}; "
                         f"AUC the training run recorded on it {_f(m['recorded_val_auc'])}; fp32 ONNX vs "
                         f"PyTorch max |Δp| {m['fp32_onnx_vs_torch_max_abs_diff']:.1e}; threshold "
                         f"{m['threshold']:.3f}; model file {m['model_file']}")
        lines.append("")
    if "draft" in s:
        d = s["draft"]
        val = d["films_in_model_splits"]
        lines += ["## Draft decoding vs full decode on full-size films (trained model)", "",
                  f"`Predictor.predict_files`, torch backend, model {d['model_file']} (threshold "
                  f"{d['threshold']:.3f}, gate {d['gate']}): the default draft decode (JPEG DCT scaling) vs "
                  f"`--full-decode`, on the films of {d['films']} and each re-encoded (temporary "
                  "folder). Probabilities with the gate off (every film gets one); gate verdicts with "
                  "it on. Input pixel diff: the model's input (uint8, after the square resize). "
                  f"Of the original films, {val['train']} are in this model's training split and "
                  f"{val['val']} in its validation split (by file name): the AUCs below say how the two "
                  "decodes compare, not how good the model is, and with this few films they are coarse.",
                  "", "| films | n (pneumonia) | max abs Δp | mean abs Δp | labels agree | gate agrees | "
                  "AUC draft | AUC full | input pixel diff max / mean |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, g in d["summary"].items():
            lines.append(f"| {name} | {g['n']} ({g['n_positive']}) | {_f(g['max_abs_prob_diff'])} | "
                         f"{_f(g['mean_abs_prob_diff'])} | {100 * g['label_agreement']:.1f} % | "
                         f"{100 * g['gate_agreement']:.1f} % | {_f(g['auc_draft'])} | {_f(g['auc_full'])} | "
                         f"{g['input_max_pixel_diff']} / {g['input_mean_pixel_diff']:.2f} |")
        cut = d["threshold"]
        flips = [x for x in d["images"] if (x["p_draft"] >= cut) != (x["p_full"] >= cut)]
        worst = max(d["images"], key=lambda x: x["abs_diff"])
        lines += ["", f"Largest change: {worst['file']} ({worst['set']}): p {worst['p_full']:.4f} full → "
                  f"{worst['p_draft']:.4f} draft. Label flips: {len(flips)}"
                  + "".join(f"; {x['file']} ({x['set']}) {x['p_full']:.3f} → {x['p_draft']:.3f}"
                            for x in flips),
                  ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- quick inputs

def _quick_inputs(tmp: Path) -> tuple[list[Path], Path, Path]:
    """A small synthetic data tree, a random-init model at 64 px and full-size phantom films."""
    from PIL import Image

    from pneumoscope.data.synthetic import make_phantom, write_kermany_tree
    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model

    data = write_kermany_tree(tmp / "chest_xray", {"train": (12, 12), "val": (2, 2), "test": (2, 2)},
                              size=64, seed=0)
    net = build_model("resnet18", "none", image_size=64).eval()
    model = save_checkpoint(tmp / "model.safetensors", net,
                            CheckpointInfo(model="resnet18", preprocessing=net.preprocessing))
    rng = np.random.default_rng(0)
    for cls, pneumonia in (("NORMAL", False), ("PNEUMONIA", True)):
        (tmp / "films" / cls).mkdir(parents=True)
        for i in range(2):
            img = Image.fromarray(make_phantom(rng, 64, pneumonia))
            img = img.resize((700, 600), Image.Resampling.BICUBIC)
            img.save(tmp / "films" / cls / f"film{i}.jpeg", quality=90)
    return [model], data, tmp / "films"


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[str(m) for m in MODELS],
                        help="trained model files (the first one also for the draft section)")
    parser.add_argument("--data", default=str(SHARED / "chest_xray"),
                        help="the data the models were trained on")
    parser.add_argument("--films", default=str(FULLRES), help="full-size films in NORMAL/PNEUMONIA folders")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--quick", action="store_true",
                        help="synthetic films and a random-init model at 64 px: a smoke run, not a result")
    parser.add_argument("--out", default=str(RESULTS / "int8-parity-cpu"), help="result path without suffix")
    args = parser.parse_args(argv)
    sections = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # ORT's quantizer logs every weight scale it adjusts at INFO, on the root logger.
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)

    import importlib.metadata

    from _env import hardware, versions
    from _sections import run_sections

    start = time.perf_counter()
    result: dict[str, Any] = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                              "hardware": hardware(), "versions": versions(), "quick": args.quick,
                              "load_average_start": round(os.getloadavg()[0], 2), "sections": {}}
    for pkg in ("onnxruntime", "onnx", "pillow"):
        result["versions"][pkg] = importlib.metadata.version(pkg)
    runners = {"int8": lambda a, _: section_int8(a), "draft": lambda a, _: section_draft(a)}
    with tempfile.TemporaryDirectory(prefix="int8-parity-quick-") as tmp:
        args.options = OPTIONS
        if args.quick:
            models, data, films = _quick_inputs(Path(tmp))
            args.models, args.data, args.films = [str(m) for m in models], str(data), str(films)
            args.options = dict(list(OPTIONS.items())[:2])
        result["inputs"] = {"models": args.models, "data": args.data, "films": args.films}
        run_sections(sections, runners, args, log.info, result, Path(args.out), to_markdown, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
