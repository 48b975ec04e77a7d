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
from typing import Any, Protocol

import lightning as L

from pneumoscope.config import RunConfig, load_config, save_config, with_overrides
from pneumoscope.data.datasets import SplitData, load_splits
from pneumoscope.data.records import write_records
from pneumoscope.evaluation.finalize import finalize_run
from pneumoscope.evaluation.leaderboard import build_leaderboard, write_leaderboard
from pneumoscope.models.registry import get_spec
from pneumoscope.runs import RunLayout, RunSummary
from pneumoscope.runtime import is_rank_zero
from pneumoscope.tracking import ParentRun, flatten, study_config, track_run
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
          progress: bool = True, tracking_parent: ParentRun | None = None,
          callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """One run: fit, pick the best epoch and the threshold on validation, evaluate on test once,
    write the run folder (:mod:`pneumoscope.runs`).

    ``resume`` continues from ``RUN/checkpoints/last.ckpt``. ``splits`` lets a caller
    (e.g. :func:`compare`) decode the data once and share it between models. The run is tracked
    in MLflow unless ``config.tracking.enabled`` is off; ``tracking_parent`` nests it under a
    study's run (:meth:`pneumoscope.tracking.Tracker.as_parent`). ``callbacks`` are extra
    Lightning callbacks (e.g. a benchmark's timers).
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
            splits = load_splits(config.data, config.split_seed)
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


@dataclass(frozen=True)
class Trial:
    """One (model, seed) of a study: its resolved run config (the folder is ``run_dir``)."""

    config: RunConfig

    @property
    def model(self) -> str:
        return self.config.model.name

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


TRIAL_STATUSES = ("finished", "skipped", "failed")


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended: ``finished`` (trained now), ``skipped`` (finished by an earlier
    run of the study) or ``failed`` (``error`` says why; the other trials go on)."""

    model: str
    run_dir: Path
    status: str
    error: str | None = None


class StudyFailedError(RuntimeError):
    """Every trial of a study failed: there is nothing to compare."""


class Executor(Protocol):
    """Runs a study's trials, each through :func:`run_trial`, and returns their outcomes in
    the order of ``trials`` (sequential here; Ray in :mod:`pneumoscope.ray_executor`)."""

    def __call__(self, trials: Sequence[Trial], splits: dict[str, SplitData], *, resume: bool,
                 parent: ParentRun, progress: bool) -> list[TrialOutcome]: ...


def run_trial(trial: Trial, splits: dict[str, SplitData], *, resume: bool = False,
              parent: ParentRun | None = None, progress: bool = True) -> TrialOutcome:
    """Train one trial of a study unless its run folder is finished already. A failure is
    returned as a ``failed`` outcome (and logged with its traceback), not raised, so the
    study's other trials go on. Every executor runs trials through this function."""
    layout = RunLayout(trial.run_dir)
    if layout.finished:
        log.info("%s already finished; skipping it (%s)", trial.model, layout.root)
        return TrialOutcome(trial.model, layout.root, "skipped")
    try:
        train(trial.config, resume=resume and layout.last_checkpoint.is_file(), splits=splits,
              progress=progress, tracking_parent=parent)
    except Exception as exc:
        log.error("%s failed: %s: %s", trial.model, type(exc).__name__, exc, exc_info=True)
        return TrialOutcome(trial.model, layout.root, "failed", f"{type(exc).__name__}: {exc}")
    return TrialOutcome(trial.model, layout.root, "finished")


def run_sequential(trials: Sequence[Trial], splits: dict[str, SplitData], *, resume: bool,
                   parent: ParentRun, progress: bool) -> list[TrialOutcome]:
    """The default executor: one trial after another in this process."""
    outcomes = []
    for i, trial in enumerate(trials, 1):
        log.info("[%d/%d] %s", i, len(trials), trial.model)
        outcomes.append(run_trial(trial, splits, resume=resume, parent=parent, progress=progress))
    return outcomes


def study_trials(config: RunConfig) -> tuple[Path, list[Trial], dict[str, str]]:
    """The study folder, its trials (one per model of ``config.compare.models``, same data,
    split and seed) and each model's weight source. Unknown model names fail here."""
    models = config.compare.models or (config.model.name,)
    for name in models:
        get_spec(name)  # unknown names fail before any training starts
    out = Path(config.out) / (config.name or "compare")
    sources = config.compare.sources(config.model.weights) if config.compare.models \
        else {models[0]: config.model.weights}
    trials = [Trial(replace(with_overrides(config, model={"name": name, "weights": sources[name]}),
                            out=str(out), name=name)) for name in models]
    return out, trials, sources


# Config keys that may differ between a finished trial and its rerun: where it is tracked,
# which other models the study has, where the folder lives.
_RERUN_FREE = ("tracking.", "compare.", "out", "name")


def check_finished_trial(trial: Trial) -> None:
    """A finished run folder is reused only for the same trial: raise ``FileExistsError``
    naming the differences when the folder's ``config.yaml`` asks for something else."""
    layout = RunLayout(trial.run_dir)
    if not layout.finished or not layout.config.is_file():
        return
    old, new = flatten(load_config(layout.config).to_dict()), flatten(trial.config.to_dict())
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(_RERUN_FREE)]
    if changed:
        raise FileExistsError(f"{layout.root} holds a finished run of another config "
                              f"({'; '.join(changed)}); choose another --out/--name")


def compare(config: RunConfig, *, resume: bool = False, progress: bool = True,
            executor: Executor | None = None) -> dict[str, Any]:
    """Train and evaluate each model of ``config.compare.models`` (same data, split and seed)
    under ``config.out/<name>``, then write ``leaderboard.{csv,md,json}`` and the report there.

    ``executor`` runs the trials (default :func:`run_sequential`; e.g.
    :class:`pneumoscope.ray_executor.RayExecutor`). Finished trials are skipped, so rerunning
    a study trains only what is missing; a failed trial is listed as failed in the leaderboard
    while the others finish (``result["failed"]``). Raises :class:`StudyFailedError` when every trial failed.
    """
    out, trials, sources = study_trials(config)
    for trial in trials:
        check_finished_trial(trial)
    pending = [t for t in trials if not RunLayout(t.run_dir).finished]
    # Decoded once, shared by all models (and not at all when every trial is finished).
    splits = load_splits(config.data, config.split_seed) if pending else {}
    run = executor or run_sequential
    # One MLflow "compare" run holds the leaderboard; the model runs nest under it.
    with track_run(study_config(config, sources), out, kind="compare", resume=resume) as parent:
        outcomes = run(trials, splits, resume=resume, parent=parent.as_parent(), progress=progress)
        if not is_rank_zero():  # DDP: the other processes only train; rank 0 writes the study
            return {"out_dir": out, "leaderboard": None, "paths": {}, "report": {}, "failed": []}
        failed = [o for o in outcomes if o.status == "failed"]
        done = [o.run_dir for o in outcomes if o.status != "failed"]
        if not done:
            raise StudyFailedError("every trial of the study failed: "
                               + "; ".join(f"{o.model}: {o.error}" for o in failed))
        board = build_leaderboard(done, n_resamples=config.eval.n_bootstrap or 1000,
                                  seed=config.eval.bootstrap_seed,
                                  failed=[{"model": o.model, "run_dir": str(o.run_dir), "error": o.error}
                                          for o in failed])
        paths = write_leaderboard(board, out)
        report = write_report(out)
        parent.log_artifacts(*paths.values(), *report.values())
    if failed:
        log.warning("%d of %d trials failed (%s); rerun the same command to retry them "
                    "(finished trials are skipped)", len(failed), len(trials),
                    ", ".join(o.model for o in failed))
    log.info("leaderboard: %s", paths["md"])
    return {"out_dir": out, "leaderboard": board, "paths": paths, "report": report,
            "outcomes": outcomes, "failed": failed}


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
