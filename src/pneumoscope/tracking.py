"""Experiment tracking in MLflow: the resolved config as params, per-epoch curves, final
metrics with 95% CIs, the run folder's files as artifacts, and tags to find runs again.

The default store is local and needs no server: ``<out>/mlflow.db`` (SQLite; MLflow 3 refuses
the old ``./mlruns`` folder store without an opt-out) with artifacts in ``<out>/mlartifacts``.
Browse it with ``mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db``.

MLflow is optional (``pip install 'pneumoscope[tracking]'``) and imported only when a run
starts, so ``pneumoscope --help`` and runs with tracking off do not pay for it. Tracking must
never cost a training run: with the default store, a missing MLflow or a failing store logs one
warning and the run goes on untracked. Only an explicit ``tracking.uri`` fails fast, before
training, because then the user asked for it.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pneumoscope import __version__
from pneumoscope.config import RunConfig
from pneumoscope.net import reachable
from pneumoscope.runs import RunSummary
from pneumoscope.runtime import is_rank_zero

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pneumoscope[tracking]'"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
# Per-epoch row keys that are not metrics (``epoch`` becomes the step).
_NOT_METRICS = ("epoch", "time")
_warned_missing = False


class TrackingError(ValueError):
    """The tracking URI the user gave cannot be used. A ``ValueError``, so the CLI reports it
    like any other bad option value (exit status 2) instead of a traceback."""


def default_store_uri(store_root: str | Path) -> str:
    """``sqlite:////abs/path/<root>/mlflow.db``: what ``mlflow ui --backend-store-uri`` reads."""
    return f"sqlite:///{(Path(store_root).resolve() / STORE_FILE).as_posix()}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"image_size": 32}}`` → ``{"data.image_size": 32}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list | tuple):
            out[f"{prefix}{key}"] = ",".join(map(str, value))
        else:
            out[f"{prefix}{key}"] = value
    return out


def final_metrics(summary: RunSummary) -> dict[str, float]:
    """Headline numbers of a finished run: ``threshold``, and per split every metric at the
    chosen threshold with its CI: ``test_auc``, ``test_auc_ci_low``, ``test_auc_ci_high``, ...
    and ``final_val_auc``, ... (the best model on validation; plain ``val_auc`` is the
    per-epoch curve)."""
    out: dict[str, Any] = {"threshold": summary.threshold,
                           "best_val_auc_during_training": summary.best_val_auc_during_training,
                           "epochs_run": summary.epochs_run, "wall_time_s": summary.wall_time_s}
    for report, prefix in ((summary.val, "final_val_"), (summary.test, "test_")):
        if report is None:
            continue
        for name, value in report.at_threshold.metrics.items():
            out[f"{prefix}{name}"] = value
        for name, bounds in report.at_threshold.ci95.items():
            if bounds:
                out[f"{prefix}{name}_ci_low"], out[f"{prefix}{name}_ci_high"] = bounds
    for test, values in (summary.val_stress or {}).items():
        for name in ("sensitivity", "specificity", "balanced_accuracy"):
            out[f"stress_{test}_{name}"] = values.get(name)
    return {k: float(v) for k, v in out.items() if _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def git_commit() -> str | None:
    """The commit of the pneumoscope source tree, where it is a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None


@dataclass(frozen=True)
class ParentRun:
    """A study's MLflow run as plain values, so that its model runs can nest under it from
    another process (a Ray worker): they open their own client at ``uri``."""

    uri: str | None
    """``None``: the study is not tracked, so its model runs are not either."""
    experiment_id: str = ""
    run_id: str = ""


class Tracker:
    """The no-op tracker: what a run gets with tracking off or MLflow missing."""

    active = False
    run_id: str | None = None

    def as_parent(self) -> ParentRun:
        """What a nested run needs to find this run (picklable)."""
        return ParentRun(None)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """One epoch's values (``train_loss``, ``val_auc``, ...), with ``step = epoch``."""

    def log_final(self, summary: RunSummary) -> None:
        """The run's final metrics with CIs (see :func:`final_metrics`)."""

    def log_artifacts(self, *paths: Path) -> None:
        """Copy files (and folders, under their own name) into the run's artifacts."""


class MlflowTracker(Tracker):
    """Logs to one MLflow run through the plain client: no global "active run" state, so
    ``compare`` can hold a parent run open while its model runs come and go."""

    active = True

    def __init__(self, client: Any, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def as_parent(self) -> ParentRun:
        if not self.active:  # the store failed earlier: the model runs go untracked too
            return ParentRun(None)
        return ParentRun(self.client.tracking_uri, self.experiment_id, self.run_id)

    def _safe(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # A failing store (disk full, server gone) must not end a training run.
        if not self.active:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            log.warning("MLflow: could not %s (%s); tracking stops for run %s", what, exc, self.run_id)
            self.active = False
            return None

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, step) for k, v in values.items()]
        if metrics:
            self._safe("log metrics", self.client.log_batch, self.run_id, metrics=metrics)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._log_metrics({k: v for k, v in metrics.items()
                           if k not in _NOT_METRICS and _is_number(v)}, step=int(epoch))

    def log_final(self, summary: RunSummary) -> None:
        self._log_metrics(final_metrics(summary), step=0)

    def log_artifacts(self, *paths: Path) -> None:
        for path in map(Path, paths):
            if path.is_dir():
                self._safe(f"log {path}", self.client.log_artifacts, self.run_id, str(path), path.name)
            elif path.is_file():
                self._safe(f"log {path}", self.client.log_artifact, self.run_id, str(path))

    def log_params(self, params: Mapping[str, Any], resumed: bool) -> None:
        from mlflow.entities import Param

        values = {k: str(v) for k, v in params.items()}
        if resumed:
            # MLflow params are write-once; a resume may change some (often train.epochs):
            # keep the first values and note the new ones as tags.
            old = self._safe("read params", self.client.get_run, self.run_id)
            old = old.data.params if old is not None else {}
            for key in [k for k in values if k in old]:
                if old[key] != values.pop(key):
                    self._safe("tag", self.client.set_tag, self.run_id, f"resumed.{key}", str(params[key]))
        if values:
            self._safe("log params", self.client.log_batch, self.run_id,
                       params=[Param(k, v) for k, v in values.items()])

    def end(self, status: str) -> None:
        self._safe("end the run", self.client.set_terminated, self.run_id, status)


def _probe(uri: str) -> None:
    """Fail in seconds on an unreachable server; MLflow's own client retries for minutes."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    ok, why = reachable(uri, timeout=5)
    if not ok:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({why}); start it, or "
                            "leave out --tracking-uri to use the local store")


def _client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``."""
    # MLflow 3 reports usage to its vendor unless told not to; clinical sites run offline and
    # should not phone home from a training job. A user can still opt in by setting it to false.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():
        # MLflow's SQLAlchemy store trips SQLAlchemy 2.1 deprecation warnings: not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        return MlflowClient(tracking_uri=uri)


def _open_experiment(config: RunConfig, store_root: Path) -> tuple[Any, str] | None:
    """An ``MlflowClient`` and the experiment id, or ``None`` when the run goes untracked."""
    global _warned_missing
    explicit = config.tracking.uri is not None
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError:
        if explicit:
            raise ModuleNotFoundError(
                f"tracking.uri / --tracking-uri needs MLflow: {INSTALL_HINT}") from None
        if not _warned_missing:
            log.warning("MLflow is not installed, so this run is not tracked (%s; "
                        "--no-tracking silences this)", INSTALL_HINT)
            _warned_missing = True
        return None
    uri = config.tracking.uri if explicit else default_store_uri(store_root)
    artifacts = None
    if not explicit:
        artifacts = (store_root.resolve() / ARTIFACT_DIR).as_uri()
    elif uri.startswith("sqlite:///"):
        # Otherwise MLflow puts a SQLite store's artifacts in ./mlruns of the current folder.
        artifacts = (Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACT_DIR).as_uri()
    try:
        if explicit:
            _probe(uri)
        with warnings.catch_warnings():
            # MLflow's SQLAlchemy store trips SQLAlchemy 2.1 deprecation warnings: not ours to fix.
            warnings.simplefilter("ignore", DeprecationWarning)
            if not explicit:
                store_root.mkdir(parents=True, exist_ok=True)
            client = _client(uri)
            name = config.tracking.experiment
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None \
                else client.create_experiment(name, artifact_location=artifacts)
    except TrackingError:
        raise
    except Exception as exc:
        if explicit:
            raise TrackingError(f"cannot track to MLflow at {uri!r}: {exc}") from exc
        log.warning("MLflow store %s unusable (%s); this run is not tracked", uri, exc)
        return None
    log.info("tracking in MLflow: %s (experiment %r)", uri, name)
    return client, experiment_id


def _run_tags(config: RunConfig, run_dir: Path, kind: str) -> dict[str, str]:
    root = config.data.root
    tags = {"kind": kind, "run_dir": str(run_dir.resolve()), "pneumoscope_version": __version__,
            "dataset": Path(root).name if root else "kermany-download",
            "weights": config.model.weights, "git_commit": git_commit()}
    if kind == "compare":
        tags.update(models=",".join(config.compare.models),
                    weights=",".join(f"{m}={w}" for m, w in config.compare.weights.items()))
    else:
        tags["model"] = config.model.name
    return {k: v for k, v in tags.items() if v}


def _find_run(client: Any, experiment_id: str, run_dir: Path) -> str | None:
    """The latest earlier run of this run folder (a resumed run continues it)."""
    folder = str(run_dir.resolve()).replace("'", "\\'")
    runs = client.search_runs([experiment_id], f"tags.run_dir = '{folder}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


@contextmanager
def track_run(config: RunConfig, run_dir: Path, *, parent: ParentRun | None = None,
              resume: bool = False, kind: str = "train") -> Iterator[Tracker]:
    """Open an MLflow run for ``run_dir`` (logging params and tags) and close it with
    FINISHED, FAILED or KILLED. Yields a no-op :class:`Tracker` when tracking is off.

    The store is ``config.tracking.uri`` or ``<config.out>/mlflow.db``. With ``parent``
    (``compare``'s run, :meth:`Tracker.as_parent`), the run nests under it in the parent's
    store and experiment, from this process or another one (a Ray worker).
    ``resume`` continues the latest run of the same folder where there is one.
    """
    if not config.tracking.enabled or not is_rank_zero() or (parent is not None and parent.uri is None):
        yield Tracker()
        return
    if parent is not None:
        assert parent.uri is not None
        try:
            client, experiment_id = _client(parent.uri), parent.experiment_id
        except Exception as exc:  # e.g. MLflow missing on a Ray worker's node
            log.warning("MLflow: cannot reach the study's store %s from here (%s); this run is "
                        "not tracked", parent.uri, exc)
            yield Tracker()
            return
    else:
        opened = _open_experiment(config, Path(config.out))
        if opened is None:
            yield Tracker()
            return
        client, experiment_id = opened
    tags = _run_tags(config, run_dir, kind)
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.run_id  # MLflow's nested-run system tag
    run_id = None
    try:
        run_id = _find_run(client, experiment_id, run_dir) if resume else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, tags=tags, run_name=run_dir.name).info.run_id
    except Exception as exc:
        if config.tracking.uri is not None:
            raise TrackingError(f"cannot start an MLflow run at {config.tracking.uri!r}: {exc}") from exc
        log.warning("MLflow: could not start a run (%s); this run is not tracked", exc)
    if run_id is None:
        yield Tracker()
        return
    tracker = MlflowTracker(client, run_id, experiment_id)
    tracker.log_params(flatten(config.to_dict()), resumed=resume)
    try:
        yield tracker
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")


def study_config(config: RunConfig, sources: Mapping[str, str]) -> RunConfig:
    """``config`` with the models and weight sources a study actually runs, for its params."""
    return replace(config, compare=replace(config.compare, models=tuple(sources),
                                           weights=dict(sources)))
