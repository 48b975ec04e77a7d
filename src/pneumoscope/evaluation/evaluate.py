"""Turn predictions into the numbers a clinician and a reviewer would trust, and save them.

Everything here is a function of (labels, probabilities, threshold, records): the model is
not needed, so any metric can be recomputed later from the saved predictions CSV.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.data.records import ImageRecord
from pneumoscope.evaluation.bootstrap import bootstrap_ci
from pneumoscope.evaluation.metrics import METRIC_NAMES, binary_metrics, confusion_counts

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN → None, numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
    return _clean(report)


def write_predictions(path: str | Path, records: Sequence[ImageRecord], probs: np.ndarray,
                      threshold: float) -> Path:
    """One row per image: enough to recompute any metric later."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "file", "patient_id", "subtype", "label", "prob_pneumonia",
                         "predicted", "threshold"])
        for r, p in zip(records, probs, strict=True):
            writer.writerow([r.path, r.file, r.patient_id, r.subtype, r.label, f"{p:.6f}",
                             int(p >= threshold), f"{threshold:.6f}"])
    return path


def read_predictions(path: str | Path) -> tuple[list[ImageRecord], np.ndarray]:
    """Inverse of :func:`write_predictions` (records and probabilities)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    records = [ImageRecord(r["path"], int(r["label"]), "", r["patient_id"], r["subtype"])
               for r in rows]
    return records, np.array([float(r["prob_pneumonia"]) for r in rows])


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2) + "\n")
    return path


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | Path, out_dir: str | Path, *, split: str | None = None,
    manifest: str | Path | None = None, group_by: str | None = None, n_bootstrap: int = 1000,
    seed: int = 0, cache_dir: str | Path | None = None, batch_size: int = 64,
    stress: bool = False,
) -> dict[str, Any]:
    """Evaluate a saved model on a data folder (the official test split, or any other
    NORMAL/PNEUMONIA tree such as an external site) at the threshold stored in the checkpoint.

    ``stress`` also scores the images under each acquisition stress test
    (:mod:`pneumoscope.evaluation.stress`) at the same threshold (``stress`` in the report).
    Writes ``metrics.json`` and ``predictions.csv`` into ``out_dir`` and returns the report.
    """
    from pneumoscope.data.cache import cached_images
    from pneumoscope.data.records import attach_manifest, load_folder
    from pneumoscope.evaluation.inference import predict_proba
    from pneumoscope.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    size = info.preprocessing.image_size
    if Path(data).suffix == ".npz":
        from pneumoscope.data.datasets import load_pneumoniamnist

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
    probs = predict_proba(model, decoded.images, batch_size=batch_size, progress=True)
    labels = decoded.labels
    report = evaluate_predictions(labels, probs, info.threshold, records=decoded.records,
                                  threshold_method=info.threshold_method,
                                  n_bootstrap=n_bootstrap, seed=seed, group_by=group_by)
    report = {"checkpoint": str(checkpoint), "model": info.model, "data": str(data),
              "split": split, "unreadable_skipped": [list(f) for f in decoded.failures],
              **report}
    if stress:
        from pneumoscope.evaluation.stress import stress_probabilities, stress_report

        stressed = stress_probabilities(model, np.asarray(decoded.images))
        report["stress"] = stress_report(labels, {"clean": probs, **stressed}, info.threshold)
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", report)
    write_predictions(out_dir / "predictions.csv", decoded.records, probs, info.threshold)
    return report
