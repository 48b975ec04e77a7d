"""The orchestration layer: a training run (fit, then finalize, tracked) and a study of several
models on one split (runs, then leaderboard and report). The CLI, benchmarks and tests call
these; each stage they call lives in its own room (training, evaluation, report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L

from pneumoscope.config import RunConfig, save_config, with_overrides
from pneumoscope.data.datasets import SplitData, load_splits
from pneumoscope.data.records import write_records
from pneumoscope.evaluation.finalize import finalize_run
from pneumoscope.evaluation.leaderboard import build_leaderboard, write_leaderboard
from pneumoscope.models.registry import get_spec
from pneumoscope.runs import RunLayout, RunSummary
from pneumoscope.runtime import is_rank_zero
from pneumoscope.tracking import Tracker, study_config, track_run
from pneumoscope.training.train import fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """Where a finished run put its outputs, and its headline numbers."""

    run_dir: Path
    checkpoint: Path
    threshold: float
    summary: RunSummary | None
    """``None`` on the non-zero ranks of a DDP run (rank 0 writes the run)."""
    wall_time_s: float


def train(config: RunConfig, *, resume: bool = False, splits: dict[str, SplitData] | None = None,
          progress: bool = True, tracking_parent: Tracker | None = None,
          callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """One run: fit, pick the best epoch and the threshold on validation, evaluate on test once,
    write the run folder (:mod:`pneumoscope.runs`).

    ``resume`` continues from ``RUN/checkpoints/last.ckpt``. ``splits`` lets a caller
    (e.g. :func:`compare`) decode the data once and share it between models. The run is tracked
    in MLflow unless ``config.tracking.enabled`` is off; ``tracking_parent`` nests it under a
    study's run. ``callbacks`` are extra Lightning callbacks (e.g. a benchmark's timers).
    """
    start = time.perf_counter()
    layout = RunLayout(config.run_dir)
    # Under DDP (``ddp``) every process runs this function; only rank 0 writes the run folder.
    lead = is_rank_zero()
    if resume and not layout.last_checkpoint.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {layout.last_checkpoint}")
    if lead and not resume and layout.last_checkpoint.is_file():
        raise FileExistsError(f"{layout.root} already holds a run; pass --resume to continue it "
                              "or choose another --out/--name")
    layout.root.mkdir(parents=True, exist_ok=True)
    if lead:
        save_config(config, layout.config)
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    with track_run(config, layout.root, parent=tracking_parent, resume=resume) as tracker:
        if splits is None:
            splits = load_splits(config.data, config.train.seed)
        if lead:
            layout.splits_dir.mkdir(exist_ok=True)
            for name, split in splits.items():
                write_records(split.records, layout.split_file(name))
        fitted = fit(config, splits, resume=resume, progress=progress,
                     epoch_sink=tracker.log_epoch, callbacks=callbacks)
        if not fitted.is_global_zero:
            # Under DDP only rank 0 selects the threshold, evaluates and writes the model file.
            return RunResult(layout.root, layout.model, float("nan"), None, 0.0)
        summary = finalize_run(fitted.model, splits, config, started=start, progress=progress,
                               fit_facts={"best_epoch_checkpoint": fitted.best_checkpoint.name,
                                          "best_val_auc_during_training": fitted.best_val_auc,
                                          "epochs_run": fitted.epochs_run,
                                          "precision": fitted.precision})
        tracker.log_final(summary)
        tracker.log_artifacts(*layout.artifacts)
    log.info("run finished in %.0f s: %s", summary.wall_time_s, layout.root)
    return RunResult(layout.root, layout.model, summary.threshold, summary, summary.wall_time_s or 0.0)


def compare(config: RunConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate each model of ``config.compare.models`` (same data, split and seed)
    under ``config.out/<name>``, then write ``leaderboard.{csv,md,json}`` and the report there."""
    models = config.compare.models or (config.model.name,)
    for name in models:
        get_spec(name)  # unknown names fail before any training starts
    out = Path(config.out) / (config.name or "compare")
    splits = load_splits(config.data, config.train.seed)  # decoded once, shared by all models
    sources = config.compare.sources(config.model.weights) if config.compare.models \
        else {models[0]: config.model.weights}
    run_dirs = []
    # One MLflow "compare" run holds the leaderboard; the model runs nest under it.
    with track_run(study_config(config, sources), out, kind="compare", resume=resume) as parent:
        for i, name in enumerate(models, 1):
            log.info("[%d/%d] training %s", i, len(models), name)
            run_config = replace(with_overrides(config, model={"name": name, "weights": sources[name]}),
                                 out=str(out), name=name)
            layout = RunLayout(run_config.run_dir)
            if layout.finished and resume:
                log.info("%s already finished; skipping (resume)", name)
            else:
                train(run_config, resume=resume and layout.last_checkpoint.is_file(), splits=splits,
                      progress=progress, tracking_parent=parent)
            run_dirs.append(layout.root)
        if not is_rank_zero():  # DDP: the other processes only train; rank 0 writes the study
            return {"out_dir": out, "leaderboard": None, "paths": {}, "report": {}}
        board = build_leaderboard(run_dirs, n_resamples=config.eval.n_bootstrap or 1000,
                                  seed=config.eval.bootstrap_seed)
        paths = write_leaderboard(board, out)
        report = write_report(out)
        parent.log_artifacts(*paths.values(), *report.values())
    log.info("leaderboard: %s", paths["md"])
    return {"out_dir": out, "leaderboard": board, "paths": paths, "report": report}


def write_report(out: Path) -> dict[str, Path]:
    """``report.{html,md}`` in the study folder. Optional: the models are trained and the
    leaderboard written already, so a missing extra or a failing report only logs a warning."""
    try:
        from pneumoscope.report import build_report

        return build_report(out)
    except ImportError as exc:
        log.warning("no report.html (%s); install 'pneumoscope[report]' and run `pneumoscope report %s`",
                    exc, out)
    except Exception as exc:
        log.warning("report.html failed (%s: %s); rebuild it with `pneumoscope report %s`",
                    type(exc).__name__, exc, out, exc_info=True)
    return {}
