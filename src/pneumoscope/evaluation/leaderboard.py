"""Compare models trained on the same split and seed: a leaderboard with CIs and a paired test.

Pure functions over run folders (``metrics.json`` + ``predictions_test.csv``), so a comparison
can be rebuilt from saved runs without retraining.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.evaluation.bootstrap import delong_test, paired_bootstrap
from pneumoscope.evaluation.metrics import METRIC_NAMES
from pneumoscope.jsonio import write_json, write_text_atomic
from pneumoscope.runs import RunLayout, read_predictions, read_summary

LEADERBOARD_METRICS = ("auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision",
                       "npv", "f1", "balanced_accuracy", "log_loss", "brier", "ece")


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def build_leaderboard(run_dirs: list[Path], *, split: str = "test", n_resamples: int = 1000,
                      seed: int = 0, failed: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Rows (one per run) with every metric and CI at the validation-chosen threshold, and a
    paired comparison of each model's AUC against the reference model.

    The reference is the model with the best *validation* AUC, the one a user would pick
    without looking at the test split. ``failed``: trials of the study that did not finish
    (``model``, ``run_dir``, ``error``), listed under ``failed`` (``rows`` holds finished runs only).
    """
    rows, predictions = [], {}
    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        report = summary.split(split)
        saved = read_predictions(RunLayout(Path(run_dir)).predictions(split))
        predictions[summary.model] = (saved.records, saved.probs)
        rows.append({
            "model": summary.model, "run_dir": str(run_dir), "weights": summary.weights,
            "threshold": summary.threshold, "val_auc": summary.val.at_threshold.metrics["auc"],
            "metrics": report.at_threshold.metrics, "ci95": report.at_threshold.ci95,
            "at_0.5": report.at_05.metrics, "wall_time_s": summary.wall_time_s,
        })
    if not rows:
        raise ValueError("no runs to compare")
    reference = max(rows, key=lambda r: r["val_auc"] if r["val_auc"] is not None else -1)
    ref_records, ref_probs = predictions[reference["model"]]
    labels = np.array([r.label for r in ref_records])
    for row in rows:
        records, probs = predictions[row["model"]]
        if [r.path for r in records] != [r.path for r in ref_records]:
            raise ValueError(f"{row['model']} was evaluated on other images than "
                             f"{reference['model']}: a paired comparison needs the same split")
        if row["model"] == reference["model"]:
            row["vs_reference"] = None
            continue
        boot = paired_bootstrap(labels, probs, ref_probs, metric="auc",
                                n_resamples=n_resamples, seed=seed)
        delong = delong_test(labels, probs, ref_probs)
        row["vs_reference"] = {"auc_difference": boot["difference"], "ci95": list(boot["ci"]),
                               "p_bootstrap": boot["p_value"], "p_delong": delong["p_value"]}
    rows.sort(key=lambda r: -(r["metrics"]["auc"] or 0))
    return {"split": split, "reference": reference["model"], "rows": rows,
            "metric_names": [m for m in LEADERBOARD_METRICS if m in METRIC_NAMES],
            "failed": [dict(f) for f in failed]}


def leaderboard_markdown(board: dict[str, Any]) -> str:
    """A readable table: metric [95% CI] at the validation threshold, then the paired test."""
    names = board["metric_names"][:6]
    head = ["model", "threshold", *names, f"ΔAUC vs {board['reference']} [95% CI]", "p (DeLong)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in board["rows"]:
        cmp_ = row["vs_reference"]
        delta = "reference" if cmp_ is None else \
            f"{cmp_['auc_difference']:+.3f} [{cmp_['ci95'][0]:+.3f}, {cmp_['ci95'][1]:+.3f}]"
        p = "" if cmp_ is None else f"{cmp_['p_delong']:.3g}"
        cells = [row["model"], f"{row['threshold']:.3f}",
                 *[_fmt(row["metrics"].get(m), row["ci95"].get(m)) for m in names], delta, p]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Split: {board['split']}. Threshold chosen on validation (patient-grouped) "
              "and applied unchanged. Reference = best validation AUC. ΔAUC: paired bootstrap; "
              "p: DeLong test for correlated ROC curves."]
    failed = board.get("failed") or []
    if failed:
        lines += ["", f"**Failed** ({len(failed)}; not in the table; rerun the same command to retry "
                  "them, finished models are skipped):", ""]
        lines += [f"- {f['model']}: {_first_line(f.get('error'))} ({f['run_dir']})" for f in failed]
    return "\n".join(lines) + "\n"


def _first_line(text: str | None, limit: int = 200) -> str:
    lines = (text or "").strip().splitlines()
    line = lines[0] if lines else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def write_leaderboard(board: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Save the leaderboard as JSON, CSV (every metric, CI bounds; failed trials last, with
    ``status`` failed) and Markdown, each file replaced atomically."""
    out_dir = Path(out_dir)
    paths = {"json": write_json(out_dir / "leaderboard.json", board),
             "csv": out_dir / "leaderboard.csv", "md": out_dir / "leaderboard.md"}
    metrics = board["metric_names"]
    header = ["model", "threshold", "val_auc", *[f"{m}{s}" for m in metrics for s in ("", "_lo", "_hi")],
              *[f"{m}_at_0.5" for m in metrics], "auc_diff_vs_ref", "auc_diff_lo", "auc_diff_hi",
              "p_bootstrap", "p_delong", "wall_time_s", "status", "error"]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in board["rows"]:
        cmp_ = row["vs_reference"] or {}
        cells = [row["model"], row["threshold"], row["val_auc"]]
        for m in metrics:
            ci = row["ci95"].get(m) or [None, None]
            cells += [row["metrics"].get(m), ci[0], ci[1]]
        cells += [row["at_0.5"].get(m) for m in metrics]
        ci = cmp_.get("ci95") or [None, None]
        cells += [cmp_.get("auc_difference"), ci[0], ci[1], cmp_.get("p_bootstrap"),
                  cmp_.get("p_delong"), row["wall_time_s"], "finished", None]
        writer.writerow(["" if c is None else c for c in cells])
    for f in board.get("failed") or []:
        writer.writerow([f["model"], *[""] * (len(header) - 3), "failed", _first_line(f.get("error"))])
    write_text_atomic(paths["csv"], buf.getvalue())
    write_text_atomic(paths["md"], leaderboard_markdown(board))
    return paths
