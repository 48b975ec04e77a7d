"""The operating threshold from out-of-fold predictions: a k-fold cross-validation of a run's
own recipe inside its training split (``pneumoscope threshold-oof``).

A run's threshold is chosen on its validation split, a few hundred films of which a handful
near the boundary decide it. Here every film of the run's *training* split gets a probability
from a model that did not train on it: the split is cut into k patient-grouped, stratified
folds (:func:`~pneumoscope.data.splits.grouped_folds`), the recipe (the run's own
``config.yaml``) is trained k times, each time on k-1 folds with the remaining fold as its
validation split, and the threshold is chosen with the run's rule on the pooled out-of-fold
probabilities: every training film once, about 5.7 times the films of a 15 % validation split.

Cost: k trainings of the recipe, each on (k-1)/k of the training split, so about k-1 times
the run's own training time (k times at most), plus one inference pass per fold. That is
why it is an option and not the default.

Choices, stated:

- OOF alone, not pooled with the run's validation split: the validation probabilities come
  from the final model (trained on all of the training split), the out-of-fold ones from k
  other models of the same recipe; mixing two score scales would make the threshold depend
  on their share. The validation split is used only to report the new threshold's
  sensitivity and specificity beside the old one's (not to choose).
- Each fold run is the recipe as it is: its best epoch is chosen on its held-out fold, exactly
  as the run chose its epoch on its validation split, then the threshold on the same films.
- The new file keeps the run's weights, gate and temperature; its threshold is applied to
  the final model's probabilities, an approximation the provenance states (fold AUCs).
- The test split is never read: the films are the run's ``splits/train.csv``.

The fold runs are ordinary run folders under ``RUN/oof/k<K>/fold<I>`` (:class:`RunLayout`): a
rerun skips finished folds and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.config import RunConfig, load_config, with_overrides
from pneumoscope.data.cache import SplitData, cached_images
from pneumoscope.data.datasets import load_pneumoniamnist
from pneumoscope.data.records import ImageRecord, read_records
from pneumoscope.data.splits import grouped_folds
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.evaluation.stress import stress_probabilities
from pneumoscope.evaluation.threshold import ThresholdRule, choose_threshold
from pneumoscope.evaluation.tta import resolve_tta
from pneumoscope.jsonio import json_safe
from pneumoscope.models.checkpoint import load_checkpoint, read_extra_tensors, save_checkpoint
from pneumoscope.pipeline import Trial, check_finished_trial, train
from pneumoscope.runs import RunFolderError, RunLayout, read_predictions, read_summary, write_predictions
from pneumoscope.site.common import check_output, provenance_entry

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5

_REPORTED = ("sensitivity", "specificity", "balanced_accuracy", "accuracy")


@dataclass(frozen=True, eq=False)
class OofResult:
    """What :func:`threshold_oof` did: the new file, the threshold and every film's OOF probability."""

    out: Path
    threshold: float
    previous_threshold: float
    rule: ThresholdRule
    records: list[ImageRecord]
    """The run's training films (the ones that could be read), in ``splits/train.csv`` order."""
    probs: np.ndarray
    """``probs[i]``: the probability of ``records[i]`` from the fold model that held it out."""
    fold_of: np.ndarray
    """``fold_of[i]``: the fold that held ``records[i]`` out."""
    fold_auc: tuple[float, ...]
    trained: tuple[int, ...]
    """Folds trained (or resumed) by this call; the others were finished before."""
    step: dict[str, Any]
    """The provenance entry written into the new model file."""


def fold_config(config: RunConfig, layout: RunLayout, folds: int, fold: int) -> RunConfig:
    """The recipe of ``config`` as fold ``fold``'s run: its folder under ``RUN/oof``; no
    tracking, stress report, gate or bootstrap (nothing of them is used), the rest unchanged."""
    folder = layout.oof_fold(folds, fold)
    return replace(with_overrides(config, eval={"stress_test": False, "fit_gate": False, "n_bootstrap": 0},
                                  tracking={"enabled": False}),
                   out=str(folder.parent), name=folder.name)


def training_films(layout: RunLayout, config: RunConfig, data: str | Path | None = None) -> SplitData:
    """The run's training split (``splits/train.csv``), decoded at its image size: nothing else
    of the data is read. ``data``: where the run's data folder (or .npz) is now, when it moved."""
    path = layout.split_file("train")
    if not path.is_file():
        raise RunFolderError(f"{path}: not found (is {layout.root} a run folder?)")
    records = read_records(path)
    root = Path(data) if data is not None else Path(config.data.root or "")
    size = config.data.image_size
    if root.suffix == ".npz":  # PneumoniaMNIST: its official train split, as the run used it
        train = load_pneumoniamnist(root, size, only=("train",))["train"]
        if len(train.records) != len(records):
            raise ValueError(f"{root}: its train split has {len(train.records)} images but the run "
                             f"trained on {len(records)} ({path})")
        return train
    if data is not None and config.data.root:
        # The recorded paths are under the data folder of training time: the same files, moved.
        records = [replace(r, path=str(root / os.path.relpath(r.path, config.data.root))) for r in records]
    missing = [r.path for r in records if not Path(r.path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the run's {len(records)} training films are not "
                                f"found (e.g. {missing[0]}): pass --data, the data folder the run "
                                "was trained on")
    return cached_images(records, size, config.data.cache_dir, desc="decoding train")


def _subset(split: SplitData, idx: np.ndarray) -> SplitData:
    return SplitData(np.asarray(split.images[idx]), [split.records[i] for i in idx])


def _check_fold_folder(fold_layout: RunLayout, held: SplitData) -> None:
    """A fold folder from an earlier call is reused only for the same held-out films."""
    path = fold_layout.split_file("val")
    if not path.is_file():
        return
    recorded = [(Path(r.path).name, r.label) for r in read_records(path)]
    if recorded != [(Path(r.path).name, r.label) for r in held.records]:
        raise FileExistsError(f"{fold_layout.root} holds a fold of other films (its splits/val.csv "
                              "differs): the training split changed since; remove the folder")


def threshold_oof(run_dir: str | Path, *, folds: int = DEFAULT_FOLDS, data: str | Path | None = None,
                  out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                  command: str | None = None) -> OofResult:
    """Choose ``run_dir``'s threshold on out-of-fold predictions of a ``folds``-fold
    cross-validation of its recipe inside its training split, and write a new model file
    (default ``RUN/model-oof<K>.safetensors``; the run's own file is never modified).

    Cost: ``folds`` trainings of the run's recipe (about ``folds - 1`` times the run's training
    time); finished folds are skipped and an interrupted one resumes, so rerunning the same call
    continues. The threshold rule is the run's (``eval.threshold_method``, and ``eval.threshold_on:
    val+stress`` pools each held-out film's stress-tested copies); probabilities are made with
    the test-time augmentation the run's model file records. The new file's ``threshold_method``
    is e.g. ``youden@oof5``, its ``metrics`` hold validation at the new threshold (the test
    metrics at the old threshold move to the provenance step, which also lists the fold count,
    the number of out-of-fold films, each fold's AUC and the wall time).
    """
    started = time.perf_counter()
    layout = RunLayout(Path(run_dir))
    if not layout.finished:
        raise RunFolderError(f"{layout.root}: not a finished run folder (no model.safetensors and "
                             "metrics.json)")
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    out = Path(out) if out is not None else layout.oof_model(folds)
    check_output(layout.model, out, overwrite)
    config = load_config(layout.config)
    model, info = load_checkpoint(layout.model)
    views = resolve_tta(info.tta, None, where=str(layout.model))
    rule = config.eval.threshold_rule
    films = training_films(layout, config, data)
    splits = grouped_folds(films.records, folds, config.split_seed)

    probs = np.full(len(films.records), np.nan)
    fold_of = np.full(len(films.records), -1)
    stressed: list[np.ndarray] = []
    stressed_labels: list[np.ndarray] = []
    fold_auc, trained, fold_times = [], [], []
    for i, (rest_idx, held_idx) in enumerate(splits):
        cfg = fold_config(config, layout, folds, i)
        fold_layout = RunLayout(cfg.run_dir)
        held = _subset(films, held_idx)
        check_finished_trial(Trial(cfg))
        _check_fold_folder(fold_layout, held)
        if fold_layout.finished:
            log.info("[fold %d/%d] finished before; reusing %s", i + 1, folds, fold_layout.root)
        else:
            log.info("[fold %d/%d] training the recipe on %d films, %d held out (%s)", i + 1, folds,
                     len(rest_idx), len(held_idx), fold_layout.root)
            train(cfg, resume=fold_layout.last_checkpoint.is_file(), progress=progress,
                  splits={"train": _subset(films, rest_idx), "val": held})
            trained.append(i)
        fold_model, _ = load_checkpoint(fold_layout.model)
        probs[held_idx] = predict_proba(fold_model, held.images, tta=views)
        fold_of[held_idx] = i
        if rule.pooled_with_stress:
            for p in stress_probabilities(fold_model, np.asarray(held.images), tta=views).values():
                stressed.append(p)
                stressed_labels.append(held.labels)
        fold_auc.append(float(binary_metrics(held.labels, probs[held_idx])["auc"]))
        fold_times.append(read_summary(fold_layout.root).wall_time_s)
        log.info("[fold %d/%d] held-out AUC %.4f", i + 1, folds, fold_auc[-1])

    labels = films.labels
    threshold = choose_threshold(np.concatenate([labels, *stressed_labels]),
                                 np.concatenate([probs, *stressed]), rule.method,
                                 target_sensitivity=rule.target_sensitivity)
    new_rule = replace(rule, oof_folds=folds)
    write_predictions(layout.oof_predictions(folds), films.records, probs, threshold)

    val = read_predictions(layout.predictions("val"))
    at = {name: {k: binary_metrics(val.labels, val.probs, t)[k] for k in _REPORTED}
          for name, t in (("previous", info.threshold), ("new", threshold))}
    step = json_safe(provenance_entry(
        "threshold-oof", layout.model, None, command=command,
        folds=folds, n_oof=len(labels), n_oof_pneumonia=int(labels.sum()),
        fold_images=[len(h) for _, h in splits], fold_auc=fold_auc,
        pooled_with_stress=rule.pooled_with_stress, tta=list(info.tta),
        fold_train_wall_time_s=fold_times, wall_time_s=round(time.perf_counter() - started, 1),
        previous={"threshold": info.threshold, "threshold_method": info.threshold_method,
                  "metrics": info.metrics},
        new={"threshold": threshold, "threshold_method": new_rule.label, "rule": new_rule.to_dict()},
        oof_at_new={k: binary_metrics(labels, probs, threshold)[k] for k in _REPORTED},
        validation=at, note="the threshold is applied to the run's own model (trained on the whole "
        "training split); the out-of-fold probabilities came from the fold models"))
    new_info = replace(info, threshold=threshold, threshold_method=new_rule.label,
                       metrics={"val": json_safe(binary_metrics(val.labels, val.probs, threshold))},
                       provenance=(*info.provenance, step), created="")
    save_checkpoint(out, model, new_info, extra_tensors=read_extra_tensors(layout.model))
    log.info("out-of-fold threshold of %s (%d folds, %d films): %.4g -> %.4g; written to %s",
             layout.root, folds, len(labels), info.threshold, threshold, out)
    return OofResult(out, threshold, info.threshold, new_rule, films.records, probs, fold_of,
                     tuple(fold_auc), tuple(trained), step)
