"""Self-describing model files: weights plus everything needed to use them.

A PneumoScope checkpoint is one ``.safetensors`` file (no pickle, so loading cannot run code)
whose metadata holds the model name, class names, preprocessing, the decision threshold chosen
on validation, the config and the metrics. Evaluate, predict, explain, export and serve need
only this file.

Steps applied after training (``pneumoscope.site``: calibrate, adapt) write a new file whose
``provenance`` lists each step, and whose ``temperature`` (logit scale, 1.0 = none) is set on
the model when it is loaded. Files written before these fields existed load with the defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pneumoscope import CLASS_NAMES, __version__
from pneumoscope.models.ensemble import Classifier, EnsembleClassifier, check_ensemble_field, rebuild_ensemble
from pneumoscope.models.factory import Preprocessing, rebuild_model

FORMAT = "pneumoscope-checkpoint/1"
_META_KEY = "pneumoscope"


class CheckpointError(ValueError):
    """A model file that cannot be used as it is: unreadable, damaged, or with a metadata field
    that would give wrong answers. The message names the file and the field."""


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata that travels with the weights."""

    model: str
    preprocessing: Preprocessing
    threshold: float = 0.5
    threshold_method: str = "default-0.5"
    class_names: tuple[str, ...] = CLASS_NAMES
    timm_name: str = ""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments the architecture was built with."""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    created: str = ""
    temperature: float = 1.0
    """Logits are divided by this before the sigmoid (temperature scaling; 1.0 = none)."""
    provenance: tuple[dict[str, Any], ...] = ()
    """Steps applied after training, oldest first (``pneumoscope.site``): each a JSON-able
    mapping with at least ``step`` and ``date``."""
    abstain_band: tuple[float, float] | None = None
    """``(low, high)`` around the threshold: probabilities in ``[low, high)`` are labelled
    uncertain (chosen on a site's films by ``pneumoscope calibrate --abstain-...``)."""
    tta: tuple[str, ...] = ()
    """The test-time augmentation views (:data:`pneumoscope.evaluation.tta.TTA_VIEWS` names) the
    threshold was chosen under; evaluate, predict and serve use them by default
    (:func:`~pneumoscope.evaluation.tta.resolve_tta`). Empty: no TTA (and files from before it)."""
    gate: dict[str, Any] | None = None
    """The input gate's metadata (:mod:`pneumoscope.guard`), its tensors stored under
    ``gate.`` in the same file; ``None``: no gate fitted (files from before the gate)."""
    ensemble: dict[str, Any] | None = None
    """A deep ensemble (:mod:`pneumoscope.models.ensemble`): ``members`` (their number),
    ``split_seed`` (the validation split they share), ``member_runs``, ``member_seeds``
    (``train.seed``) and ``member_digests``; the weights are stored as ``members.<i>.``.
    ``None``: one network."""
    digest: str = ""
    """BLAKE2b of the rest of the metadata and of every tensor, written by
    :func:`save_checkpoint` and checked by :func:`load_checkpoint`: a file damaged on disk or in
    transfer (a flipped byte in a weight gives finite nonsense, not NaN) is refused. Integrity,
    not authenticity: whoever edits the file can recompute it. Empty in files from before it."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["class_names"] = list(self.class_names)
        d["provenance"] = [dict(step) for step in self.provenance]
        d["tta"] = list(self.tta)
        # Fields added after the digest: absent when unset, as in the files written before
        # them, so those files' digests (computed over this dict) stay valid.
        for key in OPTIONAL_FIELDS:
            if not d[key]:
                del d[key]
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointInfo:
        """Read and check the metadata: a file whose fields would give wrong answers that look
        right (a NaN threshold labels everything NORMAL; std 0 makes every input infinite) is
        refused here, naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"checkpoint metadata must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported checkpoint format {d.get('format')!r} (expected {FORMAT})")
        fields = {k: v for k, v in d.items() if k != "format"}
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"checkpoint metadata has unknown field(s) {unknown}")
        for key in ("model", "preprocessing"):
            if key not in fields:
                raise ValueError(f"checkpoint metadata lacks the field {key!r}")
        _check_info_fields(fields)
        fields["preprocessing"] = Preprocessing.from_dict(fields["preprocessing"])
        fields["class_names"] = tuple(fields.get("class_names", CLASS_NAMES))
        fields["temperature"] = float(fields.get("temperature", 1.0))
        fields["provenance"] = tuple(dict(step) for step in fields.get("provenance", ()))
        fields["tta"] = tuple(fields.get("tta", ()))
        band = fields.get("abstain_band")
        if band is not None:
            low, high = (float(v) for v in band)
            if not 0.0 <= low <= float(fields.get("threshold", 0.5)) <= high <= 1.0:
                raise ValueError(f"checkpoint field abstain_band {band!r} must satisfy "
                                 "0 <= low <= threshold <= high <= 1")
            fields["abstain_band"] = (low, high)
        return cls(**fields)


OPTIONAL_FIELDS: tuple[str, ...] = ("tta", "ensemble")
"""Metadata fields left out of a file when unset (see :meth:`CheckpointInfo.to_dict`)."""


ARCH_KWARGS_ALLOWED: frozenset[str] = frozenset({"bn_eps", "pad_type"})
"""``timm.create_model`` arguments a model file may carry (the offline weights' source
conventions): anything else (a path to load, a pretrained flag) is refused."""


def _number(fields: dict[str, Any], key: str, low: float, high: float) -> None:
    value = fields.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"checkpoint field {key} must be a finite number in [{low:g}, {high:g}], "
                         f"got {_short(value)}")


def _short(value: Any) -> str:
    """``repr`` cut to a line: a field may hold a megabyte of anything."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _typed(fields: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> None:
    if key in fields and not isinstance(fields[key], kind):
        raise ValueError(f"checkpoint field {key} must be {what}, got {_short(fields[key])}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_info_fields(fields: dict[str, Any]) -> None:
    """Types and ranges of the metadata fields, before any is used: every failure is a
    ``ValueError`` that names the field (never a ``TypeError`` from deep inside)."""
    if not isinstance(fields["model"], str):
        raise ValueError(f"checkpoint field model must be a registry name, got {_short(fields['model'])}")
    _number(fields, "threshold", 0.0, 1.0)
    _number(fields, "temperature", 1e-3, 1e3)
    for key in ("threshold_method", "timm_name", "version", "created", "digest"):
        _typed(fields, key, str, "a string")
    for key in ("metrics", "config"):
        _typed(fields, key, dict, "a mapping")
    _typed(fields, "gate", (dict, type(None)), "a mapping or null")
    steps = fields.get("provenance", [])
    if not isinstance(steps, list | tuple) or not all(isinstance(step, dict) for step in steps):
        raise ValueError(f"checkpoint field provenance must be a list of mappings, got {_short(steps)}")
    band = fields.get("abstain_band")
    if band is not None and (not isinstance(band, list | tuple) or len(band) != 2
                             or not all(_is_number(v) for v in band)):
        raise ValueError(f"checkpoint field abstain_band must be null or two numbers, got {_short(band)}")
    _check_tta(fields.get("tta", []))
    names = fields.get("class_names", CLASS_NAMES)
    if not isinstance(names, list | tuple) or len(names) != 2 or not all(isinstance(n, str) for n in names):
        raise ValueError(f"checkpoint field class_names must be two names, got {_short(names)}")
    _check_preprocessing(fields["preprocessing"])
    check_ensemble_field(fields.get("ensemble"))
    check_arch_kwargs(fields.get("arch_kwargs", {}), "checkpoint field arch_kwargs")


def _check_tta(views: Any) -> None:
    from pneumoscope.evaluation.tta import VIEWS_BY_NAME

    # The threshold holds only under these exact views: a name this version does not implement
    # would be predicted some other way, at a threshold chosen for something else.
    if not isinstance(views, list | tuple) or not all(isinstance(v, str) for v in views) \
            or len(set(views)) != len(views):
        raise ValueError(f"checkpoint field tta must be a list of distinct view names, got {_short(views)}")
    unknown = [v for v in views if v not in VIEWS_BY_NAME]
    if unknown:
        raise ValueError(f"checkpoint field tta names view(s) {_short(unknown)} this version does not "
                         f"implement (it knows {sorted(VIEWS_BY_NAME)})")


def check_arch_kwargs(kwargs: Any, where: str) -> None:
    """``timm.create_model`` arguments read from a file: only :data:`ARCH_KWARGS_ALLOWED`, with
    values of the right type (timm would fail deep inside, or worse, act on them)."""
    if not isinstance(kwargs, dict) or set(kwargs) - ARCH_KWARGS_ALLOWED:
        raise ValueError(f"{where} may only hold {sorted(ARCH_KWARGS_ALLOWED)}, got {_short(kwargs)}")
    eps = kwargs.get("bn_eps", 1e-5)
    if not _is_number(eps) or not 0 < eps < 1:
        raise ValueError(f"{where}.bn_eps must be a number in (0, 1), got {_short(eps)}")
    if kwargs.get("pad_type", "") not in ("", "same", "valid"):
        raise ValueError(f"{where}.pad_type must be '', 'same' or 'valid', got {_short(kwargs['pad_type'])}")


_PREPROCESSING_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Preprocessing)}
"""``in_chans``, and the two fields this version implements one value of (``resize``,
``color``): a file asking for another would be fed pixels it was not trained on."""


def _check_preprocessing(pre: Any) -> None:
    if not isinstance(pre, dict):
        raise ValueError(f"checkpoint field preprocessing must be a mapping, got {_short(pre)}")
    unknown = sorted(set(pre) - {f.name for f in dataclasses.fields(Preprocessing)})
    if unknown:
        raise ValueError(f"checkpoint field preprocessing has unknown field(s) {unknown}")
    size = pre.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
        raise ValueError(f"checkpoint field preprocessing.image_size must be an integer in 16..1024, "
                         f"got {_short(size)}")
    chans = pre.get("in_chans", _PREPROCESSING_DEFAULTS["in_chans"])
    if isinstance(chans, bool) or chans not in (1, 3):
        raise ValueError(f"checkpoint field preprocessing.in_chans must be 1 or 3, got {_short(chans)}")
    for key, positive in (("mean", False), ("std", True)):
        values = pre.get(key)
        if not isinstance(values, list | tuple) or len(values) not in (1, chans) or not all(
                _is_number(v) and (v > 0 or not positive) for v in values):
            raise ValueError(f"checkpoint field preprocessing.{key} must be finite numbers"
                             + (" > 0" if positive else "") + f", one or in_chans ({chans}) of them, "
                             f"got {_short(values)}")
    for key in ("resize", "color"):
        expected = _PREPROCESSING_DEFAULTS[key]
        if pre.get(key, expected) != expected:
            raise ValueError(f"checkpoint field preprocessing.{key} must be {expected!r} (the only "
                             f"one this version implements), got {_short(pre[key])}")


def content_digest(info: CheckpointInfo, tensors: dict[str, torch.Tensor]) -> str:
    """:attr:`CheckpointInfo.digest` of ``info`` (its own digest left out) and ``tensors``."""
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps(replace(info, digest="").to_dict(), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


EXTRA_PREFIXES: tuple[str, ...] = ("gate.",)
"""Tensor-name prefixes of the parts of a model file that are not the classifier's weights."""


def save_checkpoint(path: str | Path, model: Classifier, info: CheckpointInfo,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights and metadata to ``path`` (a ``.safetensors`` file).

    ``info.temperature`` must be the temperature the model applies (it is what loading sets):
    a mismatch would silently change the saved model's probabilities, so it raises.
    """
    path = Path(path)
    members = len(model) if isinstance(model, EnsembleClassifier) else None
    if members != (info.ensemble or {}).get("members"):
        what = f"an ensemble of {members} members" if members else "one network"
        raise ValueError(f"the model is {what} but info.ensemble is {_short(info.ensemble)}")
    applied = float(getattr(model, "temperature", 1.0))
    if abs(applied - info.temperature) > 1e-6 * max(1.0, abs(info.temperature)):
        raise ValueError(f"model applies temperature {applied:g} but info.temperature is "
                         f"{info.temperature:g}: set both (model.set_temperature / "
                         "dataclasses.replace(info, temperature=...))")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not info.created:
        info = replace(info, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for key, value in (extra_tensors or {}).items():
        if not key.startswith(EXTRA_PREFIXES) or key in tensors:
            raise ValueError(f"extra tensor {key!r} must start with one of {EXTRA_PREFIXES}")
        tensors[key] = value.detach().cpu().contiguous()
    info = replace(info, digest=content_digest(info, tensors))
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(info.to_dict())})
    tmp.replace(path)
    return path


def read_info(path: str | Path) -> CheckpointInfo:
    """The metadata of a checkpoint, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a PneumoScope checkpoint (.safetensors): {exc}") from exc
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} has no PneumoScope metadata: was it written by `pneumoscope train`?")
    try:
        return CheckpointInfo.from_dict(json.loads(meta[_META_KEY]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable PneumoScope metadata ({exc})") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def read_extra_tensors(path: str | Path, prefix: str = "gate.") -> dict[str, torch.Tensor]:
    """The tensors of ``path`` whose names start with ``prefix`` (e.g. the input gate's), so a
    step that rewrites a model file (calibrate, adapt) can carry them over unchanged."""
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}  # noqa: SIM118


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", channels_last: bool = False
) -> tuple[Classifier, CheckpointInfo]:
    """Rebuild the model a checkpoint describes and load its weights strictly (eval mode): an
    :class:`XrayClassifier`, or an :class:`~pneumoscope.models.ensemble.EnsembleClassifier`
    for a file whose ``ensemble`` field is set."""
    from safetensors.torch import load_file

    info = read_info(path)
    model: Classifier
    try:
        if info.ensemble:
            model = rebuild_ensemble(info.model, info.preprocessing, info.ensemble["members"],
                                     arch_kwargs=info.arch_kwargs, channels_last=channels_last)
        else:
            model = rebuild_model(info.model, info.preprocessing, arch_kwargs=info.arch_kwargs,
                                  channels_last=channels_last)
    except KeyError as exc:  # not in the registry
        raise CheckpointError(f"{path}: checkpoint field model: {exc.args[0] if exc.args else exc}") from exc
    backbone = model.members[0].backbone if isinstance(model, EnsembleClassifier) else model.backbone
    stem = next((m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if stem is not None and stem.in_channels != info.preprocessing.in_chans:
        raise CheckpointError(f"{path}: checkpoint field preprocessing.in_chans is "
                              f"{info.preprocessing.in_chans} but model {info.model!r} takes "
                              f"{stem.in_channels} channels")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable weights ({exc})") from exc
    if info.digest and content_digest(info, tensors) != info.digest:
        raise CheckpointError(f"{path}: the file is damaged: its weights or metadata differ from what "
                              "was saved (checkpoint field digest); to change a threshold or "
                              "temperature use `pneumoscope calibrate`, which writes a new file")
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIXES)}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a damaged file: NaN weights give NaN probabilities
        raise CheckpointError(f"{path}: non-finite values in {len(bad)} weight tensor(s), e.g. "
                              f"{bad[0]}: the file is damaged")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch lists every missing/unexpected key over many lines: the first few, on one line.
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{path}: its tensors do not fit model {info.model!r} "
                              f"({detail[:300]}{'...' if len(detail) > 300 else ''})") from exc
    model.set_temperature(info.temperature)
    return model.to(device).eval(), info
