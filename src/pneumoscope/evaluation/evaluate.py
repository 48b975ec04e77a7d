"""Turn predictions into the numbers a clinician and a reviewer would trust, and save them.

Everything here is a function of (labels, probabilities, threshold, records): the model is
not needed, so any metric can be recomputed later from the saved predictions CSV.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.data.cache import cached_images
from pneumoscope.data.datasets import load_pneumoniamnist
from pneumoscope.data.records import ImageRecord, attach_manifest, load_folder
from pneumoscope.evaluation.bootstrap import bootstrap_ci
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.metrics import METRIC_NAMES, binary_metrics, confusion_counts
from pneumoscope.evaluation.selective import risk_at_coverage, risk_coverage, selection_score
from pneumoscope.evaluation.stress import stress_probabilities, stress_report
from pneumoscope.evaluation.tta import resolve_tta, view_names
from pneumoscope.guard.model_file import assess_records, gate_report, load_gate
from pneumoscope.jsonio import json_safe, write_json
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.runs import EvalLayout, write_gate_csv, write_predictions

log = logging.getLogger(__name__)


def operating_point(labels: np.ndarray, probs: np.ndarray, threshold: float,
                    n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Metrics, 95% CIs and the confusion matrix at one threshold."""
    point = binary_metrics(labels, probs, threshold)
    ci = bootstrap_ci(labels, probs, threshold, n_resamples=n_bootstrap, seed=seed) \
        if n_bootstrap and len(set(labels.tolist())) == 2 else {}
    return {"threshold": float(threshold), "metrics": point,
            "ci95": {k: list(v) for k, v in ci.items()},
            "confusion": confusion_counts(labels, (probs >= threshold).astype(int))}


def _breakdown(labels: np.ndarray, probs: np.ndarray, threshold: float,
               keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Counts, recall and (where both classes occur) AUC per group key."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key or "(none)"].append(i)
    out = {}
    for key, idx in sorted(groups.items()):
        y, p = labels[idx], probs[idx]
        pred = p >= threshold
        entry: dict[str, Any] = {"n": len(idx), "n_pneumonia": int(y.sum())}
        if y.sum():
            entry["sensitivity"] = float(pred[y == 1].mean())
        if (y == 0).any():
            entry["specificity"] = float((~pred[y == 0]).mean())
        if 0 < y.sum() < len(y):
            entry["auc"] = binary_metrics(y, p, threshold)["auc"]
        out[key] = entry
    return out


def evaluate_predictions(
    labels: np.ndarray, probs: np.ndarray, threshold: float, *,
    records: Sequence[ImageRecord] | None = None, threshold_method: str = "",
    n_bootstrap: int = 1000, seed: int = 0, group_by: str | None = None,
) -> dict[str, Any]:
    """The full report for one split: at the chosen threshold and at 0.5 (for comparison with
    the literature), bootstrap CIs, per-subtype recall and optional per-group metrics."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    report: dict[str, Any] = {
        "n": len(labels), "n_pneumonia": int(labels.sum()), "n_normal": int((labels == 0).sum()),
        "threshold": float(threshold), "threshold_method": threshold_method,
        "metric_names": list(METRIC_NAMES),
        "at_threshold": operating_point(labels, probs, threshold, n_bootstrap, seed),
        "at_0.5": operating_point(labels, probs, 0.5, n_bootstrap, seed),
    }
    if records is not None:
        subtypes = [r.subtype if r.label == 1 else "normal" for r in records]
        if any(s not in ("", "normal") for s in subtypes):
            report["by_subtype"] = _breakdown(labels, probs, threshold, subtypes)
        if group_by:
            values = [r.get(group_by) for r in records]
            if not any(values):
                log.warning("no record has a %r column: was the manifest given?", group_by)
            report["by_group"] = {group_by: _breakdown(labels, probs, threshold, values)}
    return json_safe(report)


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | Path, out_dir: str | Path, *, split: str | None = None,
    manifest: str | Path | None = None, group_by: str | None = None, n_bootstrap: int = 1000,
    seed: int = 0, cache_dir: str | Path | None = None, batch_size: int = 64,
    stress: bool = False, gate: bool = True, tta: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model on a data folder (the official test split, or any other
    NORMAL/PNEUMONIA tree such as an external site) at the threshold stored in the checkpoint.

    ``stress`` also scores the images under each acquisition stress test
    (:mod:`pneumoscope.evaluation.stress`) at the same threshold (``stress`` in the report).
    ``gate``: run the model file's input gate on every film (``gate`` in the report: verdict
    counts, reasons and the accuracy of accepted vs flagged films; per film in ``gate.csv``).
    ``selective`` in the report is the risk-coverage of the calls ranked by the margin from
    the threshold combined with the gate's score (:mod:`pneumoscope.evaluation.selective`).
    ``tta``: average the logits over test-time augmentation views (clean and stressed images
    alike; ``tta`` in the report names them); ``None`` follows the model file (TTA when its
    threshold was chosen under it), True/False against the file warn
    (:func:`~pneumoscope.evaluation.tta.resolve_tta`). The threshold is the checkpoint's.
    Writes ``metrics.json`` and ``predictions.csv`` into ``out_dir`` and returns the report.
    """
    model, info = load_checkpoint(checkpoint)
    size = info.preprocessing.image_size
    if Path(data).suffix == ".npz":
        split = split or "test"
        found_npz = load_pneumoniamnist(data, size)
        if split not in found_npz:
            raise ValueError(f"split {split!r} not in {data} (found: {', '.join(found_npz)})")
        decoded = found_npz[split]
    else:
        found = load_folder(data)
        if split is None:
            split = "test" if "test" in found else "all" if "all" in found else None
            if split is None:
                raise ValueError(f"{data}: no test/ folder and no NORMAL/PNEUMONIA folders at the "
                                 f"top; pass --split (found: {', '.join(found)})")
        if split not in found:
            raise ValueError(f"split {split!r} not found under {data} (found: {', '.join(found)})")
        records = found[split]
        if manifest:
            records = attach_manifest(records, manifest)
        decoded = cached_images(records, size, cache_dir, desc=f"decoding {split}")
    views = resolve_tta(info.tta, tta, where=str(checkpoint))
    probs = predict_proba(model, decoded.images, batch_size=batch_size, progress=True, tta=views)
    labels = decoded.labels
    report = evaluate_predictions(labels, probs, info.threshold, records=decoded.records,
                                  threshold_method=info.threshold_method,
                                  n_bootstrap=n_bootstrap, seed=seed, group_by=group_by)
    report = {"checkpoint": str(checkpoint), "model": info.model, "data": str(data),
              "split": split, "unreadable_skipped": [list(f) for f in decoded.failures],
              "tta": list(view_names(views)) or None, **report}
    if stress:
        stressed = stress_probabilities(model, np.asarray(decoded.images), tta=views)
        report["stress"] = stress_report(labels, {"clean": probs, **stressed}, info.threshold)
    layout = EvalLayout(Path(out_dir))
    gatekeeper = load_gate(checkpoint, info, enabled=gate)
    scores = None
    if gatekeeper.enabled:
        verdicts = assess_records(gatekeeper, [r.path for r in decoded.records], np.asarray(decoded.images))
        report["gate"] = {"state": gatekeeper.state,
                          **gate_report(verdicts, labels, probs, info.threshold)}
        write_gate_csv(layout.gate, decoded.records, verdicts)
        if gatekeeper.fitted:
            scores = np.array([v.ood_score for v in verdicts], dtype=np.float64)
    else:
        report["gate"] = {"state": "disabled"}
    if len(set(labels.tolist())) == 2:
        confidence = selection_score(probs, info.threshold, scores)
        curve = risk_coverage(labels, probs, info.threshold, confidence)
        report["selective"] = {
            "confidence": "margin from the threshold" + (" and gate score (the weaker rank)"
                                                         if scores is not None else ""),
            "aurc": curve["aurc"], "aurc_optimal": curve["aurc_optimal"], "risk_full": curve["risk_full"],
            "at_coverage": risk_at_coverage(labels, probs, info.threshold, confidence=confidence)}
    write_predictions(layout.predictions, decoded.records, probs, info.threshold)
    write_json(layout.metrics, report)
    return report
