"""Deep ensembles: several training runs of one registry model, averaged into one model file.

Members are ordinary runs that share ONE patient-grouped validation split (same
``data.split_seed``) and differ only in ``train.seed`` (initialisation, augmentation and batch
order), e.g. ``pneumoscope train ... data.split_seed=0 train.seed=1 name=m1``. No member's
validation film is then another member's training film, so the validation split can choose
the ensemble's threshold as it chose each member's.

The ensemble averages the members' *logits* (then divides by its own temperature), re-fits the
threshold on the shared validation split with the members' own rule
(:func:`pneumoscope.evaluation.finalize.choose_on_validation`) and carries the input gate of the
split. It is saved in the ordinary checkpoint format (``pneumoscope-checkpoint/1``) with the
``ensemble`` metadata field set and the member weights under ``members.<i>.``, so every command
that loads a model file (evaluate, predict, explain, export, serve, calibrate, gate fit) takes
it like any model. Training an ensemble is not a thing: train its members, then build it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumoscope import __version__
from pneumoscope.models.factory import Preprocessing, XrayClassifier, rebuild_model

log = logging.getLogger(__name__)

MAX_MEMBERS = 64
"""More members than this in a file is a damaged or hostile file, not an ensemble."""


class EnsembleClassifier(nn.Module):
    """Members of one registry model and preprocessing; returns the mean of their logits divided
    by the ensemble's own temperature (``set_temperature``; each member's must be 1)."""

    def __init__(self, members: Sequence[XrayClassifier], channels_last: bool = False) -> None:
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        for i, m in enumerate(members):
            if not isinstance(m, XrayClassifier):
                raise ValueError(f"ensemble member {i} is a {type(m).__name__}, not an XrayClassifier")
            for what, mine, theirs in (("architecture", m.timm_name, first.timm_name),
                                       ("preprocessing", m.preprocessing, first.preprocessing),
                                       ("arch_kwargs", m.arch_kwargs, first.arch_kwargs)):
                if mine != theirs:
                    raise ValueError(f"ensemble member {i} differs from member 0 in {what}: "
                                     f"{mine!r} vs {theirs!r}")
            if float(m.temperature) != 1.0:
                raise ValueError(f"ensemble member {i} applies temperature {float(m.temperature):g}: "
                                 "members must be uncalibrated (calibrate the ensemble instead)")
            m.channels_last = channels_last
        self.members = nn.ModuleList(members)
        self.preprocessing: Preprocessing = first.preprocessing
        self.arch_kwargs: dict[str, Any] = dict(first.arch_kwargs)
        self.channels_last = channels_last
        # As in XrayClassifier: set from the checkpoint's metadata, not stored as a tensor.
        self.register_buffer("temperature", torch.ones(()), False)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def timm_name(self) -> str:
        return self.members[0].timm_name

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] → the members' normalised backbone input: their preprocessing
        is identical (checked above), so it is computed once for all of them."""
        return self.members[0].normalize(x)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, N, 1): each member's logit at temperature 1 (its backbone on the shared input)."""
        z = self.normalize(x)
        return torch.stack([m.backbone(z) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(0) / self.temperature

    def set_temperature(self, temperature: float) -> None:
        """As :meth:`XrayClassifier.set_temperature`, for the averaged logit."""
        t = float(temperature)
        if not (t > 0.0 and math.isfinite(t)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature.fill_(t)

    def head_parameters(self) -> list[nn.Parameter]:
        raise TypeError("an ensemble is not trained: train its members as separate runs "
                        "(same data.split_seed, different train.seed), then `pneumoscope ensemble`")


Classifier = XrayClassifier | EnsembleClassifier
"""What :func:`pneumoscope.models.checkpoint.load_checkpoint` returns."""


def rebuild_ensemble(name: str, preprocessing: Preprocessing, n_members: int, *,
                     arch_kwargs: dict[str, Any] | None = None,
                     channels_last: bool = False) -> EnsembleClassifier:
    """An untrained ensemble with the architecture a checkpoint describes."""
    members = [rebuild_model(name, preprocessing, arch_kwargs=arch_kwargs, channels_last=channels_last)
               for _ in range(n_members)]
    return EnsembleClassifier(members, channels_last)


def check_ensemble_field(value: Any) -> None:
    """Types of the ``ensemble`` checkpoint field (``None`` or a mapping); a ``ValueError``
    naming the sub-field otherwise."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint field ensemble must be a mapping or null, got {type(value).__name__}")
    unknown = sorted(set(value) - set(ENSEMBLE_FIELDS))
    if unknown:
        raise ValueError(f"checkpoint field ensemble has unknown field(s) {unknown}")
    n = value.get("members")
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_MEMBERS:
        raise ValueError(f"checkpoint field ensemble.members must be an integer in 2..{MAX_MEMBERS}, "
                         f"got {str(n)[:40]}")
    split = value.get("split_seed")
    if isinstance(split, bool) or not isinstance(split, int) or split < 0:
        raise ValueError("checkpoint field ensemble.split_seed must be an integer >= 0, "
                         f"got {str(split)[:40]}")
    for key, kind in (("member_runs", str), ("member_seeds", int), ("member_digests", str)):
        items = value.get(key, [])
        if not isinstance(items, list | tuple) or len(items) != n or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in items):
            raise ValueError(f"checkpoint field ensemble.{key} must be {n} {kind.__name__} values, "
                             f"got {str(items)[:60]}")


ENSEMBLE_FIELDS: tuple[str, ...] = ("members", "split_seed", "member_runs", "member_seeds",
                                    "member_digests")


# --- building one from run folders -----------------------------------------------------------

_SHARED_CONFIG: tuple[tuple[str, str], ...] = (
    ("data", "root"), ("data", "val_fraction"), ("data", "subset"), ("data", "manifest"),
    ("eval", "threshold_method"), ("eval", "target_sensitivity"), ("eval", "threshold_on"))
"""Config values every member must share: the split's data, and the threshold rule the
ensemble re-fits with."""


def _relative(path: str, root: str | Path) -> str:
    """A record's path relative to its data root, so a split written on one machine compares
    with the same split loaded from another mount (``data=``)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def build_ensemble(run_dirs: Sequence[str | Path], out: str | Path, *,
                   data: str | None = None, overwrite: bool = False, tta: bool | None = None) -> Path:
    """Average the models of finished training runs ``run_dirs`` into one model file ``out``.

    Refuses (``ValueError`` naming the runs) fewer than 2 runs, members of different models,
    preprocessing, data, threshold rules or validation-split seeds, and members with the same
    ``train.seed``. Loads the shared split (``data``: its root, else the members' own), checks
    that it is every member's validation split and that no validation patient is in any member's
    training split, re-fits the threshold on it with the members' rule, and copies or re-fits
    the input gate. The test split is never scored here. An existing ``out`` is replaced
    only with ``overwrite``. ``tta``: choose the threshold on test-time-augmented validation
    probabilities and record the views in the file (so predict/serve use them by default);
    ``None``: as the members were trained (``eval.tta``).
    """
    from pneumoscope.config import TrainConfig, checkpoint_split_seed, load_config, with_overrides
    from pneumoscope.data.datasets import load_splits
    from pneumoscope.data.records import read_records
    from pneumoscope.evaluation.finalize import choose_on_validation, fit_run_gate
    from pneumoscope.evaluation.tta import TTA_VIEWS, view_names
    from pneumoscope.guard.gate import Gate
    from pneumoscope.models.checkpoint import (
        CheckpointInfo,
        load_checkpoint,
        read_extra_tensors,
        read_info,
        save_checkpoint,
    )
    from pneumoscope.runs import RunLayout

    runs = [Path(r) for r in run_dirs]
    out = Path(out)
    if len(runs) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {len(runs)}: {', '.join(map(str, runs))}")
    if len({r.resolve() for r in runs}) != len(runs):
        raise ValueError(f"the same run is given twice: {', '.join(map(str, runs))}")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    layouts = [RunLayout(r) for r in runs]
    for layout in layouts:
        if not layout.model.is_file():
            raise ValueError(f"{layout.root} is not a finished run folder: {layout.model} not found")
    infos = [read_info(layout.model) for layout in layouts]  # checked before any is loaded
    first = infos[0]
    names = [str(r) for r in runs]

    def differ(what: str, values: Sequence[Any]) -> None:
        if any(v != values[0] for v in values):
            listing = "; ".join(f"{n}: {v!r}" for n, v in zip(names, values, strict=True))
            raise ValueError(f"ensemble members must share {what}, got {listing}")

    if any(info.ensemble for info in infos):
        raise ValueError(f"members must be training runs, not ensembles: {', '.join(names)}")
    differ("the model", [info.model for info in infos])
    differ("the preprocessing", [info.preprocessing for info in infos])
    differ("the architecture arguments", [info.arch_kwargs for info in infos])
    differ("the temperature (members must be uncalibrated: calibrate the ensemble instead)",
           [info.temperature for info in infos])
    for section, key in _SHARED_CONFIG:
        differ(f"{section}.{key}", [(info.config.get(section) or {}).get(key) for info in infos])
    default_seed = TrainConfig().seed
    split_seeds = [checkpoint_split_seed(info.config, default_seed) for info in infos]
    differ("one validation split (data.split_seed, else train.seed)", split_seeds)
    seeds = [int((info.config.get("train") or {}).get("seed", default_seed)) for info in infos]
    if len(set(seeds)) != len(seeds):
        raise ValueError("ensemble members must differ in train.seed, got "
                         + "; ".join(f"{n}: {s}" for n, s in zip(names, seeds, strict=True)))
    split_seed = split_seeds[0]

    config = load_config(overrides=first.config)
    config = with_overrides(config, data={"split_seed": split_seed,
                                          **({"root": data} if data is not None else {})})
    log.info("ensemble of %d %s runs (train.seed %s) on validation split seed %d of %s",
             len(runs), first.model, seeds, split_seed, config.data.root)
    splits = load_splits(config.data, split_seed)
    splits.pop("test", None)  # never scored here
    val, root = splits["val"], config.data.root
    val_paths = {_relative(r.path, root) for r in val.records}
    for layout, info in zip(layouts, infos, strict=True):
        # A split file records where each film was on the member's machine.
        member_root = (info.config.get("data") or {}).get("root") or root
        for name in ("val", "train"):
            if not layout.split_file(name).is_file():
                raise ValueError(f"{layout.root}: {layout.split_file(name)} not found: cannot check "
                                 "that the members share one validation split")
        member_val = {_relative(r.path, member_root) for r in read_records(layout.split_file("val"))}
        if member_val != val_paths:
            raise ValueError(f"{layout.root}: its validation split ({len(member_val)} films) is not "
                             f"the shared one ({len(val_paths)} films, split seed {split_seed}, "
                             f"{root}): {len(member_val ^ val_paths)} films differ")
        train_patients = {r.patient_id for r in read_records(layout.split_file("train"))}
        leaked = train_patients & {r.patient_id for r in val.records}
        if leaked:
            raise ValueError(f"{layout.root}: {len(leaked)} validation patient(s) are in its training "
                             f"split, e.g. {sorted(leaked)[0]!r}")

    # Each member file is loaded as any model (digest and finite checks); the metadata read
    # above must be the one loaded.
    loaded = [load_checkpoint(layout.model) for layout in layouts]
    if [info for _, info in loaded] != infos:
        raise ValueError(f"a member model file changed while the ensemble was built: {', '.join(names)}")
    ensemble = EnsembleClassifier([model for model, _ in loaded])
    ec = config.eval
    # The stress tests are scored only when the threshold is chosen on them.
    ec = with_overrides(config, eval={"stress_test": ec.threshold_rule.pooled_with_stress,
                                      "tta": ec.tta if tta is None else tta}).eval
    log.info("scoring %d validation films with %d members", len(val.records), len(ensemble))
    chosen = choose_on_validation(ensemble, val, ec)
    metrics = chosen.report["at_threshold"]["metrics"]
    log.info("ensemble validation AUC %.4f at threshold %.4f (members: %s)", metrics["auc"],
             chosen.threshold, ", ".join(f"{info.metrics.get('val', {}).get('auc', float('nan')):.4f}"
                                         for info in infos))

    # The gate is fitted on the split's training and validation films with a frozen ImageNet
    # network (finalize.fit_run_gate): it does not depend on the classifier, only on the split,
    # the image size, the data root and eval.bootstrap_seed. Members that share all of these
    # carry the same gate, so member 0's is the ensemble's; otherwise it is fitted again here.
    gate_tensors = read_extra_tensors(layouts[0].model)
    gate_meta = first.gate
    same_gate = all(info.gate == gate_meta for info in infos) and len(
        {(info.config.get("eval") or {}).get("bootstrap_seed") for info in infos}) == 1
    if not same_gate:
        log.info("fitting the input gate on the shared split")
        gate: Gate | None = fit_run_gate(splits, config)
        gate_meta = gate.metadata() if gate is not None else None
        gate_tensors = gate.to_tensors() if gate is not None else {}

    info = CheckpointInfo(
        model=first.model, preprocessing=first.preprocessing, threshold=chosen.threshold,
        threshold_method=ec.threshold_rule.label, timm_name=ensemble.timm_name,
        arch_kwargs=dict(first.arch_kwargs),
        metrics={"val": metrics, "members_val": [info.metrics.get("val") for info in infos]},
        config=config.to_dict(), gate=gate_meta,
        # Members trained with eval.tta: the threshold above is one of TTA probabilities.
        tta=view_names(TTA_VIEWS if ec.tta else None),
        provenance=({"step": "ensemble", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "pneumoscope_version": __version__, "data_root": str(root),
                     "members": [os.fspath(r) for r in runs]},),
        ensemble={"members": len(runs), "split_seed": split_seed,
                  "member_runs": [os.fspath(r) for r in runs], "member_seeds": seeds,
                  "member_digests": [info.digest for info in infos]})
    path = save_checkpoint(out, ensemble, info, extra_tensors=gate_tensors or None)
    log.info("wrote %s (%d members, threshold %.4f)", path, len(runs), chosen.threshold)
    return path
