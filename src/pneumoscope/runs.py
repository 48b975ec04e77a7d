"""The run folder: its layout, the ``metrics.json`` schema and the readers, in one place.

Every module and benchmark that reads or writes a run goes through this file, so a renamed
file or key is one change here and fails at the reader with the file and the key, not far
away at run time. A run folder::

    RUN/config.yaml            resolved config
    RUN/splits/{train,val,test}.csv
    RUN/epochs.csv             per-epoch metrics (appended across --resume)
    RUN/checkpoints/{best,last}.ckpt   Lightning checkpoints (resume with --resume)
    RUN/model.safetensors      self-describing model (weights + preprocessing + threshold)
    RUN/metrics.json           validation and test reports with 95% CIs (:class:`RunSummary`)
    RUN/predictions_{val,test}.csv
    RUN/oof/k<K>/fold<I>/      run folders of an out-of-fold threshold study (threshold-oof)
    RUN/oof/k<K>/predictions_oof.csv   and each training film's out-of-fold probability
    RUN/model-oof<K>.safetensors       the run's weights with the out-of-fold threshold

A compare (study) folder holds one run folder per model plus ``leaderboard.{json,csv,md}``
and ``report.{html,md}``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.data.records import ImageRecord
from pneumoscope.evaluation.threshold import ThresholdRule
from pneumoscope.jsonio import write_json, write_text_atomic

SCHEMA_VERSION = 1
"""Version of ``metrics.json``; files written before it existed read as version 1."""


class RunFolderError(ValueError):
    """A run folder file is missing or lacks a key; the message names the file and the key."""


# --- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (nothing is created or read here)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits_dir(self) -> Path:
        return self.root / "splits"

    def split_file(self, split: str) -> Path:
        return self.splits_dir / f"{split}.csv"

    @property
    def epochs(self) -> Path:
        return self.root / "epochs.csv"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints_dir / "last.ckpt"

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def predictions(self, split: str) -> Path:
        return self.root / f"predictions_{split}.csv"

    @property
    def oof_dir(self) -> Path:
        """Out-of-fold cross-validation of this run's recipe (``pneumoscope threshold-oof``)."""
        return self.root / "oof"

    def oof_fold(self, folds: int, fold: int) -> Path:
        """The run folder of fold ``fold`` of a ``folds``-fold cross-validation (k in the name:
        a 3-fold and a 5-fold study never share a fold)."""
        return self.oof_dir / f"k{folds}" / f"fold{fold}"

    def oof_predictions(self, folds: int) -> Path:
        """Each training film's out-of-fold probability."""
        return self.oof_dir / f"k{folds}" / "predictions_oof.csv"

    def oof_model(self, folds: int) -> Path:
        """The default model file with the out-of-fold threshold (the run's weights)."""
        return self.root / f"model-oof{folds}.safetensors"

    @property
    def artifacts(self) -> tuple[Path, ...]:
        """What a tracker copies: every file of a finished run (the folder of splits too)."""
        return (self.config, self.epochs, self.metrics, self.model, self.predictions("val"),
                self.predictions("test"), self.splits_dir)

    @property
    def finished(self) -> bool:
        """Both the model file and the metrics exist (what ``compare --resume`` skips)."""
        return self.model.is_file() and self.metrics.is_file()


# --- metrics.json ----------------------------------------------------------------------------


class _Reader:
    """Typed access to one JSON mapping; a missing key raises with the file and the key path."""

    def __init__(self, data: Any, where: str, path: str = "") -> None:
        if not isinstance(data, Mapping):
            raise RunFolderError(f"{where}: {path or 'top level'} must be a mapping, got "
                                 f"{type(data).__name__}")
        self.data, self.where, self.path = data, where, path

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def need(self, key: str) -> Any:
        if key not in self.data:
            raise RunFolderError(f"{self.where}: missing key {self._key(key)!r}")
        return self.data[key]

    def sub(self, key: str) -> _Reader:
        return _Reader(self.need(key), self.where, self._key(key))

    def number(self, key: str) -> float:
        value = self.need(key)
        if value is None:  # NaN is written as null
            return math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RunFolderError(f"{self.where}: {self._key(key)} must be a number, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class OperatingPoint:
    """Metrics, their 95% CIs and the confusion matrix at one threshold."""

    threshold: float
    metrics: dict[str, float | None]
    ci95: dict[str, list[float]]
    confusion: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "metrics": self.metrics, "ci95": self.ci95,
                "confusion": self.confusion}

    @classmethod
    def read(cls, r: _Reader) -> OperatingPoint:
        return cls(r.number("threshold"), dict(r.need("metrics")), dict(r.need("ci95")),
                   dict(r.need("confusion")))


@dataclass(frozen=True)
class SplitReport:
    """The report of one split (what :func:`pneumoscope.evaluation.evaluate.evaluate_predictions`
    returns, as a typed value)."""

    n: int
    n_pneumonia: int
    n_normal: int
    threshold: float
    threshold_method: str
    metric_names: list[str]
    at_threshold: OperatingPoint
    at_05: OperatingPoint
    by_subtype: dict[str, Any] | None = None
    by_group: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys an external evaluation adds (``checkpoint``, ``data``, ``stress``, ...)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n, "n_pneumonia": self.n_pneumonia, "n_normal": self.n_normal,
            "threshold": self.threshold, "threshold_method": self.threshold_method,
            "metric_names": self.metric_names, "at_threshold": self.at_threshold.to_dict(),
            "at_0.5": self.at_05.to_dict()}
        if self.by_subtype is not None:
            out["by_subtype"] = self.by_subtype
        if self.by_group is not None:
            out["by_group"] = self.by_group
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "report") -> SplitReport:
        return cls.read(_Reader(data, where))

    @classmethod
    def read(cls, r: _Reader) -> SplitReport:
        known = {"n", "n_pneumonia", "n_normal", "threshold", "threshold_method", "metric_names",
                 "at_threshold", "at_0.5", "by_subtype", "by_group"}
        return cls(int(r.number("n")), int(r.number("n_pneumonia")), int(r.number("n_normal")),
                   r.number("threshold"), str(r.get("threshold_method", "")),
                   list(r.need("metric_names")), OperatingPoint.read(r.sub("at_threshold")),
                   OperatingPoint.read(r.sub("at_0.5")), r.get("by_subtype"), r.get("by_group"),
                   {k: v for k, v in r.data.items() if k not in known})

    def point(self, at: str = "threshold") -> OperatingPoint:
        """``"threshold"`` (the chosen one) or ``"0.5"``."""
        return self.at_threshold if at == "threshold" else self.at_05


@dataclass(frozen=True)
class RunSummary:
    """``metrics.json`` of one training run."""

    model: str
    weights: str
    threshold: float
    threshold_rule: ThresholdRule
    val: SplitReport
    test: SplitReport | None = None
    val_stress: dict[str, dict[str, Any]] | None = None
    """Validation re-scored under each acquisition stress test, at the frozen threshold."""
    gate: dict[str, Any] | None = None
    """The input gate fitted with the model: its levels and, per split, the share of films
    above each level (``None``: no gate fitted)."""
    tta: tuple[str, ...] = ()
    """Test-time augmentation views every split was scored with and the threshold was chosen
    under (``eval.tta``); empty: none."""
    best_epoch_checkpoint: str = ""
    best_val_auc_during_training: float = math.nan
    epochs_run: int = 0
    precision: str = ""
    wall_time_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    schema_version: int = SCHEMA_VERSION

    def split(self, name: str) -> SplitReport:
        """The report of ``name`` (``val`` or ``test``); raises if the run has none."""
        report = self.val if name == "val" else self.test if name == "test" else None
        if report is None:
            raise RunFolderError(f"run of {self.model}: no '{name}' results in metrics.json")
        return report

    def to_dict(self) -> dict[str, Any]:
        # Key order as the files always had it, so old and new metrics.json diff cleanly.
        out: dict[str, Any] = {
            "model": self.model, "weights": self.weights, "threshold": self.threshold,
            "threshold_method": self.threshold_rule.label,
            "best_epoch_checkpoint": self.best_epoch_checkpoint,
            "best_val_auc_during_training": self.best_val_auc_during_training,
            "epochs_run": self.epochs_run, "precision": self.precision,
            "wall_time_s": self.wall_time_s, "data": self.data, "version": self.version,
            "val": self.val.to_dict()}
        if self.test is not None:
            out["test"] = self.test.to_dict()
        if self.val_stress is not None:
            out["val_stress"] = self.val_stress
        if self.gate is not None:
            out["gate"] = self.gate
        if self.tta:
            out["tta"] = list(self.tta)
        out["threshold_rule"] = self.threshold_rule.to_dict()
        out["schema_version"] = self.schema_version
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "metrics.json") -> RunSummary:
        r = _Reader(data, where)
        version = int(r.get("schema_version", 1))
        if version > SCHEMA_VERSION:
            raise RunFolderError(f"{where}: schema_version {version} is newer than this PneumoScope "
                                 f"reads ({SCHEMA_VERSION}): upgrade pneumoscope")
        rule = r.get("threshold_rule")
        threshold_rule = ThresholdRule(**rule) if isinstance(rule, Mapping) else \
            ThresholdRule.from_label(str(r.get("threshold_method", "youden")))
        return cls(
            model=str(r.need("model")), weights=str(r.get("weights") or ""),
            threshold=r.number("threshold"), threshold_rule=threshold_rule,
            val=SplitReport.read(r.sub("val")),
            test=SplitReport.read(r.sub("test")) if "test" in data else None,
            val_stress=r.get("val_stress"), gate=r.get("gate"), tta=tuple(r.get("tta") or ()),
            best_epoch_checkpoint=str(r.get("best_epoch_checkpoint", "")),
            best_val_auc_during_training=float(r.get("best_val_auc_during_training") or math.nan),
            epochs_run=int(r.get("epochs_run") or 0), precision=str(r.get("precision", "")),
            wall_time_s=r.get("wall_time_s"), data=dict(r.get("data") or {}),
            version=str(r.get("version", "")), schema_version=version)


def read_summary(run_dir: str | Path) -> RunSummary:
    """``metrics.json`` of a run folder, checked; raises :class:`RunFolderError` naming the
    file and the missing key."""
    path = RunLayout(Path(run_dir)).metrics
    if not path.is_file():
        raise RunFolderError(f"{path}: not found (is {run_dir} a finished run folder?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc})") from exc
    return RunSummary.from_dict(data, str(path))


def write_summary(run_dir: str | Path, summary: RunSummary) -> Path:
    """Write ``metrics.json`` (atomically: a crash never leaves half a file)."""
    return write_json(RunLayout(Path(run_dir)).metrics, summary.to_dict())


# --- predictions and epochs ------------------------------------------------------------------

PREDICTION_COLUMNS = ("path", "file", "patient_id", "subtype", "label", "prob_pneumonia",
                      "predicted", "threshold")


@dataclass(frozen=True, eq=False)
class Predictions:
    """A predictions CSV: one row per image, enough to recompute any metric later."""

    records: list[ImageRecord]
    probs: np.ndarray
    predicted: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=int)


def write_predictions(path: str | Path, records: Sequence[ImageRecord], probs: np.ndarray,
                      threshold: float) -> Path:
    """One row per image (written whole or not at all)."""
    return _write_csv(path, PREDICTION_COLUMNS, (
        [r.path, r.file, r.patient_id, r.subtype, r.label, f"{p:.6f}", int(p >= threshold),
         f"{threshold:.6f}"] for r, p in zip(records, probs, strict=True)))


def _write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file, replaced atomically (:func:`~pneumoscope.jsonio.write_text_atomic`)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def read_predictions(path: str | Path) -> Predictions:
    """Inverse of :func:`write_predictions`."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path}: not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in ("path", "label", "patient_id", "subtype", "prob_pneumonia")
               if rows and c not in rows[0]]
    if missing:
        raise RunFolderError(f"{path}: missing column(s) {', '.join(missing)}")
    records = [ImageRecord(r["path"], int(r["label"]), "", r["patient_id"], r["subtype"]) for r in rows]
    probs = np.array([float(r["prob_pneumonia"]) for r in rows])
    predicted = np.array([int(r["predicted"]) if r.get("predicted") not in (None, "") else -1
                          for r in rows], dtype=int)
    return Predictions(records, probs, predicted)


def write_gate_csv(path: str | Path, records: Sequence[ImageRecord], verdicts: Sequence[Any]) -> Path:
    """One row per film: the input gate's verdict, its reasons and the learned score."""
    return _write_csv(path, ("path", "label", "gate", "gate_reason", "ood_score"), (
        [r.path, r.label, v.status, ";".join(v.reasons),
         "" if v.ood_score is None else f"{v.ood_score:.4f}"]
        for r, v in zip(records, verdicts, strict=True)))


EPOCH_CURVES = ("train_loss", "val_loss", "val_auc")


def append_epoch_row(path: str | Path, row: Mapping[str, Any]) -> Path:
    """Add one row to ``epochs.csv`` (a header first when the file is new). The file is rewritten
    atomically with the row added, so a crash never leaves a torn row; it stays small (one row
    per epoch). Appending keeps a resumed run's history (Lightning's CSVLogger starts afresh)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(row))
    if not old:
        writer.writeheader()
    writer.writerow({k: "" if v is None else v for k, v in row.items()})
    if old and not old.endswith("\n"):
        old += "\n"
    return write_text_atomic(path, old + buf.getvalue())


def drop_epoch_rows(path: str | Path, from_epoch: int) -> None:
    """Remove the rows of epoch ``from_epoch`` and later from ``epochs.csv`` (atomically): a run
    resumed from the checkpoint of epoch k-1 redoes epoch k, whose row an interrupted run may
    have written after validation but before its checkpoint."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [row for row in rows if int(float(row["epoch"])) < from_epoch]
    if len(kept) < len(rows):
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(path, buf.getvalue())


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def read_history(run_dir: str | Path) -> dict[str, list[float | None]]:
    """Per-epoch ``epoch, train_loss, val_loss, val_auc`` from ``epochs.csv`` (a resumed run
    appends: the last row of an epoch wins); empty lists when the file is missing."""
    path = RunLayout(Path(run_dir)).epochs
    by_epoch: dict[int, dict[str, float | None]] = defaultdict(dict)
    if path.is_file():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                by_epoch[int(float(row["epoch"]))].update({k: _float(row.get(k)) for k in EPOCH_CURVES})
    epochs = sorted(by_epoch)
    return {"epoch": [float(e) for e in epochs],
            **{k: [by_epoch[e].get(k) for e in epochs] for k in EPOCH_CURVES}}


def read_split_counts(run_dir: str | Path) -> list[dict[str, Any]]:
    """Images and patients per split and class from ``splits/*.csv``."""
    layout = RunLayout(Path(run_dir))
    rows = []
    for split in ("train", "val", "test"):
        path = layout.split_file(split)
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


@dataclass(frozen=True)
class EvalLayout:
    """Paths of an evaluation folder (``pneumoscope evaluate``'s ``--out``)."""

    root: Path

    @property
    def metrics(self) -> Path:
        return Path(self.root) / "metrics.json"

    @property
    def predictions(self) -> Path:
        return Path(self.root) / "predictions.csv"

    @property
    def gate(self) -> Path:
        return Path(self.root) / "gate.csv"


# --- study (compare) folders -----------------------------------------------------------------

LEADERBOARD_FILE = "leaderboard.json"


def study_run_dirs(folder: str | Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The run folders of a study folder (leaderboard order) and its leaderboard, or
    ``([folder], None)`` for one run folder, or every finished run below ``folder``."""
    folder = Path(folder)
    board_file = folder / LEADERBOARD_FILE
    if board_file.is_file():
        board = json.loads(board_file.read_text())
        dirs = []
        for row in board["rows"]:
            # Prefer the sub-folder next to the leaderboard: the folder may have been moved.
            local = folder / row["model"]
            dirs.append(local if RunLayout(local).metrics.is_file() else Path(row["run_dir"]))
        return dirs, board
    if RunLayout(folder).metrics.is_file():
        return [folder], None
    dirs = sorted(p for p in folder.iterdir() if RunLayout(p).metrics.is_file()) if folder.is_dir() else []
    if not dirs:
        raise FileNotFoundError(f"{folder}: neither a compare folder ({LEADERBOARD_FILE}) nor a run "
                                "folder (metrics.json)")
    return dirs, None
