"""Build ``report.html`` (self-contained: every image inline, no external CSS/JS/fonts) and
``report.md`` from a compare folder or a single run folder.

A pure function of the saved run folders (``metrics.json``, ``predictions_test.csv``,
``epochs.csv``, ``splits/``, ``model.safetensors``): no retraining, no data folder needed
except the test images themselves for the Grad-CAM panels and the faithfulness check.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope import __version__
from pneumoscope.data.records import ImageRecord
from pneumoscope.evaluation.compare import build_leaderboard, leaderboard_markdown
from pneumoscope.evaluation.evaluate import read_predictions
from pneumoscope.report import plots
from pneumoscope.report.template import HTML_TEMPLATE

log = logging.getLogger(__name__)

CAM_METHODS = (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"))
CAM_KINDS = (("tp", "True positives", "pneumonia, called pneumonia"),
             ("tn", "True negatives", "normal, called normal"),
             ("fp", "False positives", "normal, called pneumonia"),
             ("fn", "False negatives", "pneumonia, called normal"))
FAITHFULNESS_PERCENTILES = (10, 20, 50)
CAM_DISPLAY_SIZE = 192  # px: legible on screen, small enough to keep the file light
THRESHOLD_METHODS = {
    "youden": "Youden's J (sensitivity + specificity − 1) maximised on the validation split",
    "target_sensitivity": "the highest threshold reaching the target sensitivity on the validation split",
    "default-0.5": "the default 0.5 (no validation-based choice)",
}
LIMITATIONS = (
    "Pediatric, single-centre data (Guangzhou Women and Children's Medical Center, patients aged "
    "1–5): not expected to transfer to adults or other hospitals without re-validation there.",
    "Possible shortcut learning: on a mixed-source staging of these data a model learned the "
    "preprocessing history instead of the lungs (validation AUC 0.998, test AUC 0.047). High "
    "validation scores alone do not show that the model looks at the lungs; check the Grad-CAM "
    "panels and evaluate on external data.",
    "Class prevalence shift: 74% pneumonia in training vs 62.5% in the test split; predictive "
    "values (PPV/NPV) and the calibration depend on the prevalence where the model is used.",
    "Labels are image-level diagnoses from the public release (no radiologist consensus "
    "re-reading, no lesion localisation); the bacteria/virus subtype comes from file names.",
    "Not for clinical use: research on pediatric chest X-ray pneumonia classification only.",
)


@dataclass
class Run:
    """What the report reads from one run folder."""

    name: str
    run_dir: Path
    summary: dict[str, Any]
    records: list[ImageRecord]
    scores: plots.Scores
    history: dict[str, list[float | None]] = field(default_factory=dict)
    splits: list[dict[str, Any]] = field(default_factory=list)


# --- reading run folders ---------------------------------------------------------------------


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is None or np.isfinite(value) else None


def read_history(run_dir: Path) -> dict[str, list[float | None]]:
    """Per-epoch ``epoch, train_loss, val_loss, val_auc`` from ``epochs.csv``, or from
    Lightning's ``logs/metrics.csv`` for runs made before ``epochs.csv`` existed."""
    keys = ("train_loss", "val_loss", "val_auc")
    path = run_dir / "epochs.csv"
    by_epoch: dict[int, dict[str, float | None]] = defaultdict(dict)
    if path.is_file():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                # A resumed run appends: the last row of an epoch wins.
                by_epoch[int(float(row["epoch"]))].update({k: _float(row.get(k)) for k in keys})
    elif (run_dir / "logs" / "metrics.csv").is_file():
        names = {"train_loss_epoch": "train_loss", "val_loss": "val_loss", "val_auc": "val_auc"}
        with open(run_dir / "logs" / "metrics.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                for src, dst in names.items():
                    if _float(row.get(src)) is not None:
                        by_epoch[int(float(row["epoch"]))][dst] = _float(row[src])
    epochs = sorted(by_epoch)
    return {"epoch": [float(e) for e in epochs], **{k: [by_epoch[e].get(k) for e in epochs] for k in keys}}


def read_splits(run_dir: Path) -> list[dict[str, Any]]:
    """Images and patients per split and class from ``splits/*.csv``."""
    rows = []
    for split in ("train", "val", "test"):
        path = run_dir / "splits" / f"{split}.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as fh:
            items = [(int(r["label"]), r.get("patient_id", "")) for r in csv.DictReader(fh)]
        row: dict[str, Any] = {"split": split, "images": len(items),
                               "patients": len({p for _, p in items})}
        for label, cls in ((0, "normal"), (1, "pneumonia")):
            row[f"{cls}_images"] = sum(1 for y, _ in items if y == label)
            row[f"{cls}_patients"] = len({p for y, p in items if y == label})
        row["pneumonia_share"] = row["pneumonia_images"] / row["images"] if items else None
        rows.append(row)
    return rows


def _run_dirs(folder: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The run folders of a compare folder (leaderboard order) or ``[folder]`` for one run."""
    board_file = folder / "leaderboard.json"
    if board_file.is_file():
        board = json.loads(board_file.read_text())
        dirs = []
        for row in board["rows"]:
            # Prefer the sub-folder next to the leaderboard: the folder may have been moved.
            local = folder / row["model"]
            dirs.append(local if (local / "metrics.json").is_file() else Path(row["run_dir"]))
        return dirs, board
    if (folder / "metrics.json").is_file():
        return [folder], None
    dirs = sorted(p for p in folder.iterdir() if (p / "metrics.json").is_file()) if folder.is_dir() else []
    if not dirs:
        raise FileNotFoundError(f"{folder}: neither a compare folder (leaderboard.json) nor a run "
                                "folder (metrics.json)")
    return dirs, None


def load_runs(folder: str | Path) -> tuple[list[Run], dict[str, Any]]:
    """Every run of ``folder`` and the leaderboard (read, or built for a single run)."""
    folder = Path(folder)
    dirs, board = _run_dirs(folder)
    if board is None:
        board = build_leaderboard(dirs, n_resamples=200)
    runs = []
    for run_dir in dirs:
        summary = json.loads((run_dir / "metrics.json").read_text())
        records, probs = read_predictions(run_dir / "predictions_test.csv")
        labels = np.array([r.label for r in records], dtype=int)
        with open(run_dir / "predictions_test.csv", newline="") as fh:
            predicted = np.array([int(r["predicted"]) for r in csv.DictReader(fh)], dtype=int)
        runs.append(Run(summary["model"], run_dir, summary, records,
                        plots.Scores(labels, probs, float(summary["threshold"]),
                                     summary["test"]["at_threshold"]["metrics"].get("auc"), predicted),
                        read_history(run_dir), read_splits(run_dir)))
    return runs, board


# --- Grad-CAM --------------------------------------------------------------------------------


def pick_examples(scores: plots.Scores, k: int, patients: list[str] | None = None) -> dict[str, list[int]]:
    """Indices of the ``k`` most confident true/false positives/negatives: errors the model was
    surest about teach a reader the most, and so do its clearest successes. With ``patients``,
    at most one image per patient and kind (two films of one child show the reader little new)."""
    pred = scores.predicted.astype(bool) if scores.predicted is not None else scores.probs >= scores.threshold
    y = scores.labels == 1
    masks = {"tp": y & pred, "tn": ~y & ~pred, "fp": ~y & pred, "fn": y & ~pred}
    out = {}
    for kind, mask in masks.items():
        idx = np.flatnonzero(mask)
        # Positive calls: highest probability first; negative calls: lowest first.
        order = np.argsort(-scores.probs[idx] if kind in ("tp", "fp") else scores.probs[idx], kind="stable")
        chosen: list[int] = []
        seen: set[str] = set()
        for i in idx[order].tolist():
            if len(chosen) == k:
                break
            if patients is not None and patients[i]:
                if patients[i] in seen:
                    continue
                seen.add(patients[i])
            chosen.append(i)
        out[kind] = chosen
    return out


def _resolve(path: str, run_dir: Path) -> Path | None:
    """An image path from a predictions CSV: as written (relative to where training ran), or
    relative to the run folder."""
    p = Path(path)
    for candidate in (p, run_dir / p):
        if candidate.is_file():
            return candidate
    return None


def _heatmaps(model: Any, info: Any, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Heatmaps (N, S, S) per CAM method for model-size uint8 images, in batches: what
    :func:`pneumoscope.explain.cam.explain` computes one image at a time, much faster on a CPU."""
    from pneumoscope.data.datasets import to_model_input
    from pneumoscope.explain.cam import _cams, cam_session, resolve_spec

    spec, size = resolve_spec(model, info), info.preprocessing.image_size
    x_all = to_model_input(images).to(next(model.parameters()).device)
    out = {}
    for method, _ in CAM_METHODS:
        with cam_session(model, spec, method, (size, size)) as cam:
            out[method] = np.concatenate([_cams(cam, x_all[i:i + batch_size], method)[0]
                                          for i in range(0, len(x_all), batch_size)])
    return out


def _cam_panels(run: Run, k: int, faithfulness_images: int, seed: int = 0) -> dict[str, Any]:
    """Grad-CAM and Grad-CAM++ panels for the chosen examples, and the ROAD faithfulness of both
    methods over a random sample of test images."""
    from pneumoscope.data.decode import load_grayscale, resize_square
    from pneumoscope.explain.cam import faithfulness, overlay_png
    from pneumoscope.models.checkpoint import load_checkpoint

    checkpoint = run.run_dir / "model.safetensors"
    if not checkpoint.is_file():
        return {"note": f"no model file in {run.run_dir}: no Grad-CAM for {run.name}", "groups": [],
                "faithfulness": []}
    model, info = load_checkpoint(checkpoint)
    size = info.preprocessing.image_size
    display = max(size, CAM_DISPLAY_SIZE)
    picked = pick_examples(run.scores, k, [r.patient_id for r in run.records])
    groups, todo = [], []  # todo: (entry, original image) of the panels to draw
    for kind, title, meaning in CAM_KINDS:
        examples = []
        for i in picked[kind]:
            rec = run.records[i]
            entry: dict[str, Any] = {"file": Path(rec.path).name, "prob": float(run.scores.probs[i]),
                                     "subtype": rec.subtype, "images": [], "note": None}
            examples.append(entry)
            path = _resolve(rec.path, run.run_dir)
            if path is None:
                entry["note"] = f"image not found: {rec.path}"
                continue
            try:
                todo.append((entry, load_grayscale(path)))
            except (ValueError, OSError) as exc:  # ImageDecodeError is a ValueError
                entry["note"] = f"unreadable image: {exc}"
        groups.append({"kind": kind, "title": title, "meaning": meaning, "examples": examples})
    if todo:
        # The model sees exactly what it saw in evaluation: the original resized to its size.
        heat = _heatmaps(model, info, np.stack([resize_square(g, size) for _, g in todo]))
        for j, (entry, gray) in enumerate(todo):
            shown = resize_square(gray, display)  # sharper than the model's input, same framing
            entry["images"].append(("X-ray", overlay_png(shown, np.zeros((size, size), np.float32), "X-ray",
                                                         alpha=0.0, min_width=display)))
            for method, label in CAM_METHODS:
                entry["images"].append((label, overlay_png(shown, heat[method][j], label, min_width=display)))

    table, note = [], None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(run.records))
    sample = []
    for i in order:
        if len(sample) >= faithfulness_images:
            break
        path = _resolve(run.records[i].path, run.run_dir)
        if path is not None:
            try:
                sample.append(resize_square(load_grayscale(path), size))
            except (ValueError, OSError):
                continue
    if faithfulness_images > 0 and sample:
        for method, label in CAM_METHODS:
            result = faithfulness(model, np.stack(sample), method, FAITHFULNESS_PERCENTILES,
                                  spec=info, seed=seed)
            result["label"] = label
            result["mean_gap"] = float(np.mean(list(result["gap"].values())))
            table.append(result)
    elif faithfulness_images > 0:
        note = "no readable test image: faithfulness not measured"
    return {"note": None, "groups": groups, "faithfulness": table, "faithfulness_note": note}


# --- summaries -------------------------------------------------------------------------------


def _point(run: Run, which: str = "at_threshold") -> dict[str, Any]:
    return run.summary["test"][which]


def _threshold_text(summary: dict[str, Any]) -> str:
    method, _, pool = (summary.get("threshold_method") or "youden").partition("@")
    method, _, target = method.partition("=")
    cfg_target = (summary.get("config") or {}).get("eval", {}).get("target_sensitivity")
    text = THRESHOLD_METHODS.get(method, method)
    if method == "target_sensitivity" and (target or cfg_target):
        text += f" (target {float(target or cfg_target):g})"
    if pool == "val+stress":
        text = text.replace("on the validation split", "on the validation split pooled with its "
                            "stress-tested copies (changed exposure, blur, noise, compression)")
    return text


def _config(run: Run) -> dict[str, Any]:
    """The run's resolved config (``config.yaml``), or empty."""
    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _report_markdown(ctx: dict[str, Any], board: dict[str, Any]) -> str:
    s = ctx["summary"]
    lines = [f"# PneumoScope report: {ctx['title']}", "",
             f"Generated {ctx['generated']} by PneumoScope {__version__}. "
             "**Research use only. Not a medical device.**", "",
             "## Summary", "",
             f"- Best model by validation AUC: **{s['model']}** (validation AUC {s['val_auc']}).",
             f"- Test AUC: **{s['auc']}** (95% CI {s['auc_ci']}), {s['n']} test images "
             f"({s['n_pneumonia']} pneumonia).",
             f"- At the frozen threshold {s['threshold']} ({s['threshold_method']}): sensitivity "
             f"**{s['sensitivity']}** ({s['sensitivity_ci']}), specificity **{s['specificity']}** "
             f"({s['specificity_ci']}).", "",
             "## Leaderboard (test split)", "", leaderboard_markdown(board).rstrip(), "",
             "## Threshold: validation-chosen vs 0.5 (test split)", "",
             "| model | threshold | sensitivity | specificity | accuracy | F1 |", "|---|---|---|---|---|---|"]
    for row in ctx["thresholds"]:
        for point in row["points"]:
            lines.append(f"| {row['model']} | {point['label']} | {point['sensitivity']} | "
                         f"{point['specificity']} | {point['accuracy']} | {point['f1']} |")
    if ctx["stress"]:
        names = [name for name, _, _ in ctx["stress"][0]["cells"]]
        lines += ["", "## Robustness to acquisition changes (validation; specificity / sensitivity "
                  "at the frozen threshold)", "", "| model | threshold | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for row in ctx["stress"]:
            lines.append(f"| {row['model']} | {row['threshold']} | "
                         + " | ".join(f"{spec} / {sens}" for _, spec, sens in row["cells"]) + " |")
    if ctx["faithfulness"]:
        gaps = " | ".join(f"gap {p}%" for p in FAITHFULNESS_PERCENTILES)
        lines += ["", "## Grad-CAM faithfulness (ROAD)", "",
                  f"| model | method | images | {gaps} | mean gap | faithful |",
                  "|---|---|---|" + "---|" * len(FAITHFULNESS_PERCENTILES) + "---|---|"]
        for row in ctx["faithfulness"]:
            lines.append(f"| {row['model']} | {row['label']} | {row['n']} | "
                         + " | ".join(f"{row['gap'][p]:+.3f}" for p in FAITHFULNESS_PERCENTILES)
                         + f" | {row['mean_gap']:+.3f} | {'yes' if row['faithful'] else 'no'} |")
    lines += ["", "## Limitations", "", *[f"- {text}" for text in LIMITATIONS], "",
              "Figures, Grad-CAM panels and model cards: `report.html`.", ""]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(bounds: list[float] | None) -> str:
    return f"{bounds[0]:.3f}–{bounds[1]:.3f}" if bounds and None not in bounds else ""


def _p(comparison: dict[str, Any] | None, key: str) -> str | None:
    value = (comparison or {}).get(key)
    return None if value is None else f"{value:.3g}"


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, cam_examples: int = 2,
                 cams: bool = True, faithfulness_images: int = 16) -> dict[str, Path]:
    """Write ``report.html`` and ``report.md`` for a compare folder or a run folder into
    ``out_dir`` (default: ``run_dir``); returns ``{"html": path, "md": path}``.

    ``cam_examples``: Grad-CAM examples per kind (true/false positives/negatives) and model;
    ``cams=False`` leaves out the Grad-CAM panels and the faithfulness table (no model is loaded);
    ``faithfulness_images``: test images the ROAD faithfulness is averaged over (0: none).
    """
    from jinja2 import Environment

    folder = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else folder
    runs, board = load_runs(folder)
    reference = board["reference"]
    rows = {row["model"]: row for row in board["rows"]}
    runs.sort(key=lambda r: [row["model"] for row in board["rows"]].index(r.name))
    colors = plots.model_colors([r.name for r in runs])
    scores = {r.name: r.scores for r in runs}
    ref_run = next(r for r in runs if r.name == reference)
    point = _point(ref_run)
    m, ci = point["metrics"], point["ci95"]
    summary = {
        "model": reference, "val_auc": _fmt(rows[reference]["val_auc"]), "auc": _fmt(m.get("auc")),
        "auc_ci": _ci(ci.get("auc")), "sensitivity": _fmt(m.get("sensitivity")),
        "sensitivity_ci": _ci(ci.get("sensitivity")), "specificity": _fmt(m.get("specificity")),
        "specificity_ci": _ci(ci.get("specificity")), "threshold": _fmt(ref_run.summary["threshold"]),
        "threshold_method": _threshold_text(ref_run.summary), "n": ref_run.summary["test"]["n"],
        "n_pneumonia": ref_run.summary["test"]["n_pneumonia"], "n_models": len(runs),
        "color": colors[reference],
    }

    leaderboard = []
    for row in board["rows"]:
        vs = row.get("vs_reference")
        leaderboard.append({
            "model": row["model"], "color": colors[row["model"]], "weights": row.get("weights") or "",
            "val_auc": _fmt(row["val_auc"]), "threshold": _fmt(row["threshold"]),
            "cells": [(_fmt(row["metrics"].get(k)), _ci(row["ci95"].get(k)))
                      for k in ("auc", "pr_auc", "sensitivity", "specificity", "accuracy", "f1")],
            "delta": None if vs is None else f"{vs['auc_difference']:+.3f}",
            "delta_ci": None if vs is None else f"{vs['ci95'][0]:+.3f} to {vs['ci95'][1]:+.3f}",
            "p_delong": _p(vs, "p_delong"), "p_bootstrap": _p(vs, "p_bootstrap"),
            "reference": row["model"] == reference,
        })

    thresholds = []
    for r in runs:
        points = []
        for which, label in (("at_threshold", f"val-chosen {r.summary['threshold']:.3f}"), ("at_0.5", "0.5")):
            pm, pci = _point(r, which)["metrics"], _point(r, which)["ci95"]
            keys = ("sensitivity", "specificity", "accuracy", "f1")
            points.append({"label": label, **{k: _fmt(pm.get(k)) for k in keys},
                           **{f"{k}_ci": _ci(pci.get(k)) for k in keys}})
        thresholds.append({"model": r.name, "color": colors[r.name], "points": points})

    # Validation re-scored under acquisition changes (train's eval.stress_test), if recorded.
    stress = [{"model": r.name, "color": colors[r.name], "threshold": _fmt(r.summary["threshold"]),
               "cells": [(name, _fmt(v.get("specificity"), 2), _fmt(v.get("sensitivity"), 2))
                         for name, v in r.summary["val_stress"].items()]}
              for r in runs if r.summary.get("val_stress")]

    confusions = []
    for r in runs:
        conf = _point(r)["confusion"]
        png = plots.confusion_plot(conf, f"{r.name} @ {r.summary['threshold']:.3f}", colors[r.name])
        confusions.append({"model": r.name, "color": colors[r.name],
                           "threshold": _fmt(r.summary["threshold"]), "png": _b64(png)})

    subtypes = []
    for r in runs:
        by = r.summary["test"].get("by_subtype") or {}
        subtypes.append({"model": r.name, "color": colors[r.name], "cells": [
            (name, (by.get(name) or {}).get("n"),
             _fmt((by.get(name) or {}).get("specificity" if name == "normal" else "sensitivity")))
            for name in ("bacteria", "virus", "normal")]})
    groups = []
    for r in runs:
        for column, entries in (r.summary["test"].get("by_group") or {}).items():
            groups.append({"model": r.name, "color": colors[r.name], "column": column, "rows": [
                {"key": key, "n": e.get("n"), "n_pneumonia": e.get("n_pneumonia"),
                 "sensitivity": _fmt(e.get("sensitivity")), "specificity": _fmt(e.get("specificity")),
                 "auc": _fmt(e.get("auc"))} for key, e in entries.items()]})

    histories = {r.name: r.history for r in runs if r.history.get("epoch")}
    splits = ref_run.splits
    same_split = all(r.splits == splits for r in runs)
    data_json = ref_run.summary.get("data") or {}

    cam_sections, faith_rows, cam_note = [], [], None
    if cams:
        try:
            import pneumoscope.explain.cam  # noqa: F401  (fails here, once, if grad-cam is missing)
        except ModuleNotFoundError as exc:
            cam_note = f"Grad-CAM panels left out: {exc}"
            log.warning("%s", cam_note)
        else:
            for r in runs:
                log.info("report: Grad-CAM for %s", r.name)
                cam = _cam_panels(r, cam_examples, faithfulness_images)
                for group in cam["groups"]:
                    for ex in group["examples"]:
                        ex["images"] = [(label, _b64(png)) for label, png in ex["images"]]
                cam_sections.append({"model": r.name, "color": colors[r.name], **cam})
                faith_rows += [{"model": r.name, "color": colors[r.name], **row}
                               for row in cam["faithfulness"]]
    else:
        cam_note = "Grad-CAM panels and the faithfulness check were left out (--no-cams)."

    cards = []
    for r in runs:
        pm, pci = _point(r)["metrics"], _point(r)["ci95"]
        cfg = _config(r)
        cards.append({
            "model": r.name, "color": colors[r.name], "weights": rows[r.name].get("weights") or "",
            "image_size": (cfg.get("data") or {}).get("image_size"),
            "epochs": r.summary.get("epochs_run"), "wall_time": r.summary.get("wall_time_s"),
            "threshold": _fmt(r.summary["threshold"]), "threshold_method": _threshold_text(r.summary),
            "val_auc": _fmt(rows[r.name]["val_auc"]),
            "metrics": [(label, _fmt(pm.get(k)), _ci(pci.get(k))) for k, label in (
                ("auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("sensitivity", "Sensitivity"),
                ("specificity", "Specificity"), ("precision", "PPV"), ("npv", "NPV"),
                ("accuracy", "Accuracy"), ("f1", "F1"), ("ece", "ECE"), ("brier", "Brier score"))],
            "data": r.summary.get("data") or {},
        })

    ctx = {
        "title": folder.resolve().name, "generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": __version__, "summary": summary, "leaderboard": leaderboard, "reference": reference,
        "split": board.get("split", "test"), "thresholds": thresholds, "stress": stress,
        "confusions": confusions,
        "subtypes": subtypes, "groups": groups, "splits": splits, "same_split": same_split,
        "data_json": data_json, "cams": cam_sections, "cam_note": cam_note, "cam_examples": cam_examples,
        "faithfulness": faith_rows, "percentiles": FAITHFULNESS_PERCENTILES,
        "faithfulness_images": faithfulness_images, "cards": cards, "limitations": LIMITATIONS,
        "models": [{"name": r.name, "color": colors[r.name]} for r in runs],
        "roc_png": _b64(plots.roc_plot(scores, colors)), "pr_png": _b64(plots.pr_plot(scores, colors)),
        "reliability_png": _b64(plots.reliability_plot(scores, colors)),
        "curves_png": _b64(plots.training_curves_plot(histories, colors)) if histories else None,
    }
    html = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True) \
        .from_string(HTML_TEMPLATE).render(**ctx)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "md": out / "report.md"}
    paths["html"].write_text(html, encoding="utf-8")
    paths["md"].write_text(_report_markdown(ctx, board), encoding="utf-8")
    log.info("report: %s (%.1f MB)", paths["html"], paths["html"].stat().st_size / 1e6)
    return paths
