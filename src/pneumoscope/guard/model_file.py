"""The gate inside a model file: read it back, or add one to an existing model
(``pneumoscope gate fit``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.data.decode import DecodedImage, ImageDecodeError, decode_image
from pneumoscope.guard.checks import MIN_SIDE_PX, Tolerances
from pneumoscope.guard.gate import Gate, Verdict, fit_gate
from pneumoscope.models.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    read_extra_tensors,
    read_info,
    save_checkpoint,
)

log = logging.getLogger(__name__)

_warned: set[str] = set()


def load_gate(checkpoint: str | Path, info: CheckpointInfo | None = None, *,
              enabled: bool = True) -> Gate:
    """The gate a model file carries: fitted, or (a file from before the gate) the deterministic
    checks only, with one warning per file; :meth:`Gate.disabled` when not ``enabled``
    (``--no-gate``)."""
    if not enabled:
        return Gate.disabled()
    info = info or read_info(checkpoint)
    try:
        gate = Gate.from_state(read_extra_tensors(checkpoint), info.gate)
    except (ValueError, TypeError, KeyError) as exc:  # a damaged or hand-edited gate
        raise CheckpointError(f"{checkpoint}: checkpoint field gate: {exc}") from exc
    if not gate.fitted and str(checkpoint) not in _warned:
        _warned.add(str(checkpoint))
        log.warning("%s has no fitted input gate: only the deterministic checks run (colour, size, "
                    "flat images, DICOM tags); add the learned one with `pneumoscope gate fit %s "
                    "--data ROOT --out NEW`", checkpoint, checkpoint)
    return gate


MNIST_SIDE_PX = 28
"""Side of PneumoniaMNIST's source images (a ``.npz`` data root)."""


def tolerances_for(data_root: str | Path | None) -> Tolerances:
    """Default tolerances, with the smallest plausible side lowered to the training images'
    own where those are small (PneumoniaMNIST's 28 px sources)."""
    if str(data_root or "").endswith(".npz"):
        return Tolerances(min_side=min(MIN_SIDE_PX, MNIST_SIDE_PX))
    return Tolerances()


def fit_gate_for(train_images: np.ndarray, val_images: np.ndarray, image_size: int, *,
                 data_root: str | Path | None = None, seed: int = 0) -> Gate:
    """:func:`fit_gate` with the tolerances of the data the model was trained on."""
    return fit_gate(train_images, val_images, image_size=image_size, seed=seed,
                    tolerances=tolerances_for(data_root))


def score_rates(gate: Gate, images: np.ndarray) -> dict[str, float] | None:
    """Share of ``images`` (uint8 (N, S, S)) whose learned score is above the warn and the refuse
    level, and the score's quartiles; ``None`` for a gate without a score."""
    scores = gate.scores(np.ascontiguousarray(images))
    if scores is None or gate.levels is None or not len(scores):
        return None
    return {"n": len(scores), "above_warn": float(np.mean(scores > gate.levels.warn)),
            "above_refuse": float(np.mean(scores > gate.levels.refuse)),
            "score_quartiles": [float(q) for q in np.quantile(scores, [0.25, 0.5, 0.75])]}


def assess_records(gate: Gate, paths: Sequence[str], images: np.ndarray) -> list[Verdict]:
    """Verdicts for evaluated films: each file is decoded again for the checks that need its
    source (colour, size, DICOM tags); the learned score reuses ``images`` (uint8 (N, S, S),
    what the classifier got). Films without a readable file (a PneumoniaMNIST array) get the
    score and the flatness check only."""
    decoded = []
    for path, img in zip(paths, images, strict=True):
        try:
            decoded.append(decode_image(path, draft_size=np.shape(img)[-1]))
        except (ImageDecodeError, OSError):
            # No source to judge its size or colour by: pass those checks, keep the rest.
            side = max(MIN_SIDE_PX, *np.shape(img))
            decoded.append(DecodedImage(np.asarray(img), side, side, 0.0))
    return gate.assess(decoded, np.ascontiguousarray(images)) if decoded else []


def gate_report(verdicts: Sequence[Verdict], labels: np.ndarray, probs: np.ndarray,
                threshold: float) -> dict[str, Any]:
    """What the gate did on a labelled set: verdict counts and reasons, and whether the films
    it accepted are called more accurately than the ones it flagged."""
    status = np.array([v.status for v in verdicts])
    reasons: dict[str, int] = {}
    for v in verdicts:
        for r in v.reasons:
            reasons[r] = reasons.get(r, 0) + 1
    correct = (probs >= threshold).astype(int) == labels
    out: dict[str, Any] = {"n": len(verdicts),
                           "counts": {s: int((status == s).sum()) for s in ("ok", "warn", "refuse")},
                           "reasons": dict(sorted(reasons.items()))}
    for s in ("ok", "warn", "refuse"):
        mask = status == s
        out[f"accuracy_{s}"] = float(correct[mask].mean()) if mask.any() else None
    scores = [v.ood_score for v in verdicts if v.ood_score is not None]
    if scores:
        out["score_quartiles"] = [float(q) for q in np.quantile(scores, [0.25, 0.5, 0.75])]
    return out


def add_gate(checkpoint: str | Path, gate: Gate, out: str | Path) -> Path:
    """Write ``checkpoint`` with ``gate`` to ``out`` (a new file; the input is never modified)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {out} is the input model file: write the gated model to a new file")
    model, info = load_checkpoint(checkpoint)
    info = replace(info, gate=gate.metadata(), created="")
    return save_checkpoint(out, model, info, extra_tensors=gate.to_tensors())
