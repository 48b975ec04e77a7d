"""Run a study's trials as Ray tasks: on a local Ray instance, or on a cluster (``ray start``).

``pneumoscope compare --executor ray`` hands each (model, seed) of the study to Ray as one task
with its own resources (``--cpus-per-trial``, ``--gpus-per-trial``); the task runs the same
:func:`pneumoscope.pipeline.run_trial` as the sequential executor, so the run folders, the
leaderboard and the report are the same. Plain Ray tasks rather than Ray Tune trials: the
trials are fixed configurations, not a search, and each already writes its own run folder,
checkpoints and MLflow run; Tune would add its own result folders, checkpoint protocol and
the ``ray[tune]`` dependencies (pandas, pyarrow) for nothing a study uses.

What a cluster needs: PneumoScope installed on every node (same version), and ``--out`` on a
filesystem every node sees at the same path (each trial writes its run folder there; the
leaderboard is built from them on the driver). The decoded images travel through Ray's object
store, so ``--data`` needs to be readable on the driver only. The default MLflow store is a
SQLite file in ``--out``; on several nodes use a tracking server (``--tracking-uri``).

Ray is imported here only, so no other command pays for it (``pip install 'pneumoscope[ray]'``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pneumoscope.data.cache import SplitData
from pneumoscope.pipeline import Trial, TrialOutcome, run_trial
from pneumoscope.runs import RunLayout
from pneumoscope.tracking import ParentRun

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pneumoscope[ray]'"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModuleNotFoundError(f"--executor ray needs Ray: {INSTALL_HINT}") from None
    return ray


def _trial_task(trial: Trial, splits: dict[str, SplitData], resume: bool, parent: ParentRun,
                cwd: str, threads: int, hide_gpus: bool) -> TrialOutcome:
    """One trial inside a Ray worker (a fresh process per trial: ``max_calls=1``)."""
    if hide_gpus:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for tasks without GPUs; a CPU trial must not
        # let Lightning's accelerator "auto" take the node's GPUs from the GPU trials.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from pneumoscope import logs

    logs.configure()
    logs.tame_lightning()
    torch.set_num_threads(threads)
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative --out/--data mean what they meant on the driver
    else:
        log.warning("the driver's folder %s does not exist on this node; relative paths are read "
                    "from %s", cwd, os.getcwd())
    return run_trial(trial, splits, resume=resume, parent=parent, progress=False)


@dataclass(frozen=True)
class RayExecutor:
    """Runs trials as Ray tasks (see the module docstring); an :class:`~pneumoscope.pipeline.Executor`."""

    address: str | None = None
    """A running cluster (``auto``: the one ``ray start`` made on this node, or
    ``ray://host:10001``); ``None``: start a local instance for the study and stop it after."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    num_cpus: int | None = None
    """CPUs of the local instance (``None``: every core Ray finds); not with ``address``."""

    def __post_init__(self) -> None:
        if not self.cpus_per_trial > 0:
            raise ValueError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if not 0 <= self.gpus_per_trial <= 1:
            # Several GPUs for one trial means DDP inside a Ray task, which Lightning's launcher
            # cannot do from a Ray worker; use `--devices N --strategy ddp` on one node instead.
            raise ValueError(f"--gpus-per-trial must be in [0, 1] (one GPU or a share of one), "
                             f"got {self.gpus_per_trial}")
        if importlib.util.find_spec("ray") is None:  # fail before any data is decoded
            raise ModuleNotFoundError(f"--executor ray needs Ray: {INSTALL_HINT}")
        if self.num_cpus is not None and (self.address is not None or self.num_cpus < 1):
            raise ValueError(f"num_cpus ({self.num_cpus}) sizes a local Ray instance: >= 1, "
                             "and not with an address")

    def _check_trials(self, trials: Sequence[Trial]) -> None:
        for trial in trials:
            accelerator = trial.config.train.accelerator
            if self.gpus_per_trial == 0 and accelerator in ("gpu", "cuda"):
                raise ValueError(f"--accelerator {accelerator} with --gpus-per-trial 0: give each "
                                 "trial a GPU (--gpus-per-trial 1)")

    def _check_resources(self, ray: Any) -> None:
        total = ray.cluster_resources()
        short = [f"{want:g} {name} per trial, the cluster has {total.get(name, 0):g}"
                 for name, want in (("CPU", self.cpus_per_trial), ("GPU", self.gpus_per_trial))
                 if want > total.get(name, 0)]
        if not short:
            return
        if self.address is None:
            raise ValueError(f"the local Ray instance cannot run a trial: {'; '.join(short)}")
        # A cluster with an autoscaler may still add such nodes; a fixed one would wait forever.
        log.warning("no node can run a trial yet (%s); waiting for the cluster to grow",
                    "; ".join(short))

    def __call__(self, trials: Sequence[Trial], splits: dict[str, SplitData], *, resume: bool,
                 parent: ParentRun, progress: bool) -> list[TrialOutcome]:
        outcomes: dict[int, TrialOutcome] = {}
        todo = []
        for i, trial in enumerate(trials):
            if RunLayout(trial.run_dir).finished:
                # run_trial only reports the skip: no Ray needed (a finished study never starts it).
                outcomes[i] = run_trial(trial, splits, resume=resume, parent=parent)
            else:
                todo.append(i)
        if todo:
            self._check_trials([trials[i] for i in todo])
            outcomes.update(self._run([trials[i] for i in todo], todo, splits, resume, parent))
        return [outcomes[i] for i in range(len(trials))]

    def _run(self, trials: list[Trial], index: list[int], splits: dict[str, SplitData], resume: bool,
             parent: ParentRun) -> dict[int, TrialOutcome]:
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, num_cpus=self.num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING)
        try:
            self._check_resources(ray)
            log.info("Ray: %d trial(s), %g CPU and %g GPU each, on %s", len(trials),
                     self.cpus_per_trial, self.gpus_per_trial,
                     {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
            task = ray.remote(
                max_calls=1,  # a fresh process per trial: its memory is returned when it ends
                max_retries=0,  # a crashed trial is reported; rerun with --resume to continue it
            )(_trial_task).options(num_cpus=self.cpus_per_trial, num_gpus=self.gpus_per_trial)
            splits_ref = ray.put(splits)  # decoded once on the driver, shared by every trial
            pending = {task.remote(trial, splits_ref, resume, parent, os.getcwd(),
                                   max(1, int(self.cpus_per_trial)), self.gpus_per_trial == 0): (i, trial)
                       for i, trial in zip(index, trials, strict=True)}
            return self._collect(ray, pending)
        finally:
            if started:
                ray.shutdown()

    @staticmethod
    def _collect(ray: Any, pending: dict[Any, tuple[int, Trial]]) -> dict[int, TrialOutcome]:
        """Outcomes as trials end; a task Ray could not run (a crashed worker, a lost node) is
        a failed trial, like one whose training raised."""
        outcomes: dict[int, TrialOutcome] = {}
        total = len(pending)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i, trial = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        outcome = TrialOutcome(trial.model, trial.run_dir, "failed",
                                               f"{type(exc).__name__}: {exc}")
                    outcomes[i] = outcome
                    log.info("[%d/%d] %s %s%s", len(outcomes), total, trial.model, outcome.status,
                             f": {outcome.error}" if outcome.error else "")
        except BaseException:
            for ref in pending:  # interrupted: stop the trials still running
                ray.cancel(ref, force=True)
            raise
        return outcomes
