"""Build ``report.html`` (self-contained: every image inline, no external CSS/JS/fonts) and
``report.md`` from a compare folder or a single run folder.

A pure function of the saved run folders (``metrics.json``, ``predictions_test.csv``,
``epochs.csv``, ``splits/``, ``model.safetensors``): no retraining, no data folder needed
except the test images themselves for the Grad-CAM panels and the faithfulness check.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from jinja2 import Environment, PackageLoader

from pneumoscope import __version__
from pneumoscope.data.cache import cached_images
from pneumoscope.data.decode import load_grayscale, resize_square
from pneumoscope.data.records import ImageRecord
from pneumoscope.evaluation.leaderboard import build_leaderboard, leaderboard_markdown
from pneumoscope.guard.model_file import load_gate, score_rates
from pneumoscope.models.checkpoint import load_checkpoint, read_info
from pneumoscope.notice import LIMITATIONS
from pneumoscope.report import plots
from pneumoscope.runs import (
    OperatingPoint,
    RunLayout,
    RunSummary,
    read_history,
    read_predictions,
    read_split_counts,
    read_summary,
    study_run_dirs,
)
from pneumoscope.site.common import find_images

log = logging.getLogger(__name__)

CAM_METHODS = (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"))
CAM_KINDS = (("tp", "True positives", "pneumonia, called pneumonia"),
             ("tn", "True negatives", "normal, called normal"),
             ("fp", "False positives", "normal, called pneumonia"),
             ("fn", "False negatives", "pneumonia, called normal"))
FAITHFULNESS_PERCENTILES = (10, 20, 50)
CAM_DISPLAY_SIZE = 192  # px: legible on screen, small enough to keep the file light
@dataclass
class Run:
    """What the report reads from one run folder."""

    name: str
    run_dir: Path
    summary: RunSummary
    records: list[ImageRecord]
    scores: plots.Scores
    history: dict[str, list[float | None]] = field(default_factory=dict)
    splits: list[dict[str, Any]] = field(default_factory=list)


# --- reading run folders ---------------------------------------------------------------------


def load_runs(folder: str | Path) -> tuple[list[Run], dict[str, Any]]:
    """Every run of ``folder`` and the leaderboard (read, or built for a single run)."""
    dirs, board = study_run_dirs(folder)
    if board is None:
        board = build_leaderboard(dirs, n_resamples=200)
    runs = []
    for run_dir in dirs:
        summary = read_summary(run_dir)
        saved = read_predictions(RunLayout(run_dir).predictions("test"))
        runs.append(Run(summary.model, run_dir, summary, saved.records,
                        plots.Scores(saved.labels, saved.probs, summary.threshold,
                                     summary.split("test").at_threshold.metrics.get("auc"),
                                     saved.predicted),
                        read_history(run_dir), read_split_counts(run_dir)))
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


def _cam_panels(run: Run, k: int, faithfulness_images: int, seed: int = 0) -> dict[str, Any]:
    """Grad-CAM and Grad-CAM++ panels for the chosen examples, and the ROAD faithfulness of both
    methods over a random sample of test images."""
    from pneumoscope.explain.cam import faithfulness, heatmaps, overlay_png  # the optional extra

    checkpoint = RunLayout(run.run_dir).model
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
        batch = np.stack([resize_square(g, size) for _, g in todo])
        heat = {method: heatmaps(model, info, batch, method) for method, _ in CAM_METHODS}
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


def _point(run: Run, which: str = "threshold") -> OperatingPoint:
    return run.summary.split("test").point(which)


def _config(run: Run) -> dict[str, Any]:
    """The run's resolved config (``config.yaml``), or empty."""
    path = RunLayout(run.run_dir).config
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def _external_gate_row(checkpoint: Path, folder: str | Path) -> dict[str, Any]:
    """The gate's rates on every image under ``folder`` (decoded at the model's size)."""
    gate = load_gate(checkpoint)
    records = find_images(folder)
    images = cached_images(records, read_info(checkpoint).preprocessing.image_size,
                           desc=f"decoding {Path(folder).name}").images
    rates = score_rates(gate, np.asarray(images)) or {}
    return {"n": rates.get("n", len(records)), "warn": _fmt(rates.get("above_warn")),
            "refuse": _fmt(rates.get("above_refuse")),
            "quartiles": " / ".join(f"{q:.0f}" for q in rates.get("score_quartiles", []))}


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
    if ctx["gates"]:
        lines += ["", "## Input gate (share of films above the validation-set levels)", "",
                  "| model | levels (warn / refuse) | split | films | above warn | above refuse |",
                  "|---|---|---|---|---|---|"]
        for g in ctx["gates"]:
            lines += [f"| {g['model']} | {g['levels']} | {row['split']} | {row['n']} | {row['warn']} | "
                      f"{row['refuse']} |" for row in g["rows"]]
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
                 cams: bool = True, faithfulness_images: int = 16,
                 external: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.html`` and ``report.md`` for a compare folder or a run folder into
    ``out_dir`` (default: ``run_dir``); returns ``{"html": path, "md": path}``.

    ``cam_examples``: Grad-CAM examples per kind (true/false positives/negatives) and model;
    ``cams=False`` leaves out the Grad-CAM panels and the faithfulness table (no model is loaded);
    ``faithfulness_images``: test images the ROAD faithfulness is averaged over (0: none);
    ``external``: image folders (e.g. another hospital's films) whose input-gate scores are
    reported beside validation and test.
    """
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
    m, ci = point.metrics, point.ci95
    ref_test = ref_run.summary.split("test")
    summary = {
        "model": reference, "val_auc": _fmt(rows[reference]["val_auc"]), "auc": _fmt(m.get("auc")),
        "auc_ci": _ci(ci.get("auc")), "sensitivity": _fmt(m.get("sensitivity")),
        "sensitivity_ci": _ci(ci.get("sensitivity")), "specificity": _fmt(m.get("specificity")),
        "specificity_ci": _ci(ci.get("specificity")), "threshold": _fmt(ref_run.summary.threshold),
        "threshold_method": ref_run.summary.threshold_rule.describe(), "n": ref_test.n,
        "n_pneumonia": ref_test.n_pneumonia, "n_models": len(runs),
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
        for which, label in (("threshold", f"val-chosen {r.summary.threshold:.3f}"), ("0.5", "0.5")):
            pm, pci = _point(r, which).metrics, _point(r, which).ci95
            keys = ("sensitivity", "specificity", "accuracy", "f1")
            points.append({"label": label, **{k: _fmt(pm.get(k)) for k in keys},
                           **{f"{k}_ci": _ci(pci.get(k)) for k in keys}})
        thresholds.append({"model": r.name, "color": colors[r.name], "points": points})

    # Validation re-scored under acquisition changes (train's eval.stress_test), if recorded.
    stress = [{"model": r.name, "color": colors[r.name], "threshold": _fmt(r.summary.threshold),
               "cells": [(name, _fmt(v.get("specificity"), 2), _fmt(v.get("sensitivity"), 2))
                         for name, v in r.summary.val_stress.items()]}
              for r in runs if r.summary.val_stress]

    # The input gate fitted with each model (metrics.json "gate"), if any.
    gates = []
    for r in runs:
        g = r.summary.gate or {}
        if not g.get("levels"):
            continue
        rows_ = [{"split": split, "n": rates["n"], "warn": _fmt(rates["above_warn"]),
                  "refuse": _fmt(rates["above_refuse"]),
                  "quartiles": " / ".join(f"{q:.0f}" for q in rates["score_quartiles"])}
                 for split, rates in g.items() if split not in ("levels", "tolerances") and rates]
        for other in external:
            rows_.append({"split": f"external: {Path(other).name}",
                          **_external_gate_row(RunLayout(r.run_dir).model, other)})
        gates.append({"model": r.name, "color": colors[r.name], "rows": rows_,
                      "levels": f"{g['levels']['warn']:.0f} / {g['levels']['refuse']:.0f}"})

    confusions = []
    for r in runs:
        conf = _point(r).confusion
        png = plots.confusion_plot(conf, f"{r.name} @ {r.summary.threshold:.3f}", colors[r.name])
        confusions.append({"model": r.name, "color": colors[r.name],
                           "threshold": _fmt(r.summary.threshold), "png": _b64(png)})

    subtypes = []
    for r in runs:
        by = r.summary.split("test").by_subtype or {}
        subtypes.append({"model": r.name, "color": colors[r.name], "cells": [
            (name, (by.get(name) or {}).get("n"),
             _fmt((by.get(name) or {}).get("specificity" if name == "normal" else "sensitivity")))
            for name in ("bacteria", "virus", "normal")]})
    groups = []
    for r in runs:
        for column, entries in (r.summary.split("test").by_group or {}).items():
            groups.append({"model": r.name, "color": colors[r.name], "column": column, "rows": [
                {"key": key, "n": e.get("n"), "n_pneumonia": e.get("n_pneumonia"),
                 "sensitivity": _fmt(e.get("sensitivity")), "specificity": _fmt(e.get("specificity")),
                 "auc": _fmt(e.get("auc"))} for key, e in entries.items()]})

    histories = {r.name: r.history for r in runs if r.history.get("epoch")}
    splits = ref_run.splits
    same_split = all(r.splits == splits for r in runs)
    data_json = ref_run.summary.data

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
        pm, pci = _point(r).metrics, _point(r).ci95
        cfg = _config(r)
        cards.append({
            "model": r.name, "color": colors[r.name], "weights": rows[r.name].get("weights") or "",
            "image_size": (cfg.get("data") or {}).get("image_size"),
            "epochs": r.summary.epochs_run, "wall_time": r.summary.wall_time_s,
            "threshold": _fmt(r.summary.threshold), "threshold_method": r.summary.threshold_rule.describe(),
            "val_auc": _fmt(rows[r.name]["val_auc"]),
            "metrics": [(label, _fmt(pm.get(k)), _ci(pci.get(k))) for k, label in (
                ("auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("sensitivity", "Sensitivity"),
                ("specificity", "Specificity"), ("precision", "PPV"), ("npv", "NPV"),
                ("accuracy", "Accuracy"), ("f1", "F1"), ("ece", "ECE"), ("brier", "Brier score"))],
            "data": r.summary.data,
        })

    ctx = {
        "title": folder.resolve().name, "generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": __version__, "summary": summary, "leaderboard": leaderboard, "reference": reference,
        "failed": board.get("failed") or [],
        "split": board.get("split", "test"), "thresholds": thresholds, "stress": stress, "gates": gates,
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
    html = Environment(loader=PackageLoader("pneumoscope.report", "templates"), autoescape=True,
                       trim_blocks=True, lstrip_blocks=True).get_template("report.html.j2").render(**ctx)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "md": out / "report.md"}
    paths["html"].write_text(html, encoding="utf-8")
    paths["md"].write_text(_report_markdown(ctx, board), encoding="utf-8")
    log.info("report: %s (%.1f MB)", paths["html"], paths["html"].stat().st_size / 1e6)
    return paths
