"""After training: the operating threshold, the stress tests, the one test evaluation and the
model file. The step every training run ends with (:func:`pneumoscope.pipeline.train`).

The threshold is chosen on validation only and frozen before the test split is scored; the
test split is read here, once, and never feeds a choice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pneumoscope import __version__
from pneumoscope.config import EvalConfig, RunConfig
from pneumoscope.data.cache import SplitData
from pneumoscope.evaluation.evaluate import evaluate_predictions
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.stress import stress_probabilities, stress_report
from pneumoscope.evaluation.threshold import choose_threshold
from pneumoscope.evaluation.tta import TTA_VIEWS, view_names
from pneumoscope.guard.gate import Gate
from pneumoscope.guard.model_file import fit_gate_for, score_rates
from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
from pneumoscope.models.ensemble import Classifier
from pneumoscope.models.factory import XrayClassifier
from pneumoscope.runs import RunLayout, RunSummary, SplitReport, write_predictions, write_summary

log = logging.getLogger(__name__)


def data_summary(splits: dict[str, SplitData]) -> dict[str, Any]:
    """Images, pneumonia images, patients and skipped files per split."""
    return {name: {"images": len(s.records), "pneumonia": int(s.labels.sum()),
                   "patients": len({r.patient_id for r in s.records}),
                   "unreadable_skipped": len(s.failures)}
            for name, s in splits.items()}


def fit_run_gate(splits: dict[str, SplitData], config: RunConfig) -> Gate | None:
    """The input gate of a run, fitted on its training films with levels set on its validation
    films (never the test split); ``None`` with a warning when the frozen network's offline
    weights are not installed (the model file then carries no learned gate)."""
    try:
        return fit_gate_for(np.asarray(splits["train"].images), np.asarray(splits["val"].images),
                            config.data.image_size, data_root=config.data.root,
                            seed=config.eval.bootstrap_seed)
    except ModuleNotFoundError as exc:
        log.warning("no input gate fitted (%s); the model file will carry the deterministic "
                    "checks only", exc)
        return None


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class ValidationChoice:
    """The operating threshold chosen on validation, and what it was chosen from."""

    threshold: float
    val_probs: np.ndarray
    """P(pneumonia) of each validation film, float64 (N,)."""
    stressed: dict[str, np.ndarray]
    """Stress test name → the validation probabilities under it (empty when not run)."""
    report: dict[str, Any]
    """:func:`evaluate_predictions` of validation at ``threshold``."""


def choose_on_validation(model: Classifier, val: SplitData, ec: EvalConfig) -> ValidationChoice:
    """Score validation (and its stress-tested copies, if ``ec`` asks), choose the threshold with
    ``ec.threshold_rule`` and report validation at it: the choice every model file's threshold
    comes from (a training run's, and a deep ensemble's, :mod:`pneumoscope.models.ensemble`)."""
    rule = ec.threshold_rule
    views = TTA_VIEWS if ec.tta else None  # eval.tta: the threshold of TTA probabilities
    val_probs = predict_proba(model, val.images, tta=views)
    stressed = stress_probabilities(model, np.asarray(val.images), tta=views) \
        if ec.stress_test or rule.pooled_with_stress else {}
    if rule.pooled_with_stress:
        # Every stress-tested copy keeps its label: choose on the pooled scores.
        pool_labels = np.tile(val.labels, len(stressed) + 1)
        pool_probs = np.concatenate([val_probs, *stressed.values()])
    else:
        pool_labels, pool_probs = val.labels, val_probs
    threshold = choose_threshold(pool_labels, pool_probs, rule.method,
                                 target_sensitivity=rule.target_sensitivity)
    report = evaluate_predictions(val.labels, val_probs, threshold, records=val.records,
                                  threshold_method=rule.label, n_bootstrap=ec.n_bootstrap,
                                  seed=ec.bootstrap_seed)
    return ValidationChoice(float(threshold), val_probs, stressed, report)


def finalize_run(model: XrayClassifier, splits: dict[str, SplitData], config: RunConfig, *,
                 fit_facts: dict[str, Any], started: float, progress: bool = True) -> RunSummary:
    """Choose the threshold on validation (``config.eval``), stress-test validation, evaluate the
    test split once at that threshold (every split scored with test-time augmentation when
    ``eval.tta``, and the model file says so), and write the run folder's predictions, model file and
    ``metrics.json`` (last, so its presence means the run is complete).

    ``fit_facts``: what training reports about itself (``best_epoch_checkpoint``,
    ``best_val_auc_during_training``, ``epochs_run``, ``precision``); ``started``: the run's
    ``time.perf_counter()`` at its start (``wall_time_s`` counts from there).
    """
    layout = RunLayout(config.run_dir)
    ec = config.eval
    rule = ec.threshold_rule
    val = splits["val"]
    # With eval.tta the threshold is an operating point of TTA probabilities: every split is
    # scored the same way, and the model file records the views so predict and serve follow.
    views = TTA_VIEWS if ec.tta else None
    chosen = choose_on_validation(model, val, ec)
    threshold, val_probs, stressed = chosen.threshold, chosen.val_probs, chosen.stressed
    reports = {"val": chosen.report}
    write_predictions(layout.predictions("val"), val.records, val_probs, threshold)
    if "test" in splits and splits["test"].records:
        test = splits["test"]
        test_probs = predict_proba(model, test.images, progress=progress, tta=views)
        reports["test"] = evaluate_predictions(
            test.labels, test_probs, threshold, records=test.records, threshold_method=rule.label,
            n_bootstrap=ec.n_bootstrap, seed=ec.bootstrap_seed, group_by=ec.group_by)
        write_predictions(layout.predictions("test"), test.records, test_probs, threshold)

    summary = RunSummary(
        model=config.model.name, weights=config.model.weights, threshold=float(threshold),
        threshold_rule=rule, val=SplitReport.from_dict(reports["val"], "val report"),
        test=SplitReport.from_dict(reports["test"], "test report") if "test" in reports else None,
        val_stress=stress_report(val.labels, {"clean": val_probs, **stressed}, threshold)
        if stressed else None, tta=view_names(views),
        wall_time_s=round(time.perf_counter() - started, 1), data=data_summary(splits),
        version=__version__, **fit_facts)
    gate = fit_run_gate(splits, config) if ec.fit_gate else None
    if gate is not None:
        assert gate.levels is not None
        summary = replace(summary, gate={
            "levels": gate.levels.to_dict(), "tolerances": gate.tolerances.to_dict(),
            **{name: score_rates(gate, split.images) for name, split in splits.items()
               if name != "train" and split.records}})
    info = CheckpointInfo(
        model=config.model.name, preprocessing=model.preprocessing, threshold=float(threshold),
        threshold_method=rule.label, timm_name=model.timm_name,
        arch_kwargs=model.arch_kwargs,
        metrics={k: v["at_threshold"]["metrics"] for k, v in reports.items()},
        config=config.to_dict(), gate=gate.metadata() if gate is not None else None,
        tta=view_names(views))
    save_checkpoint(layout.model, model, info, extra_tensors=gate.to_tensors() if gate else None)
    write_summary(layout.root, summary)
    return summary
