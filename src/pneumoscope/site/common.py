"""What calibrate and adapt share: reading a site's films, fingerprinting them, raw logits, the
output-path rules and the provenance entry every site step records."""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoscope import __version__
from pneumoscope.data.cache import SplitData, cached_images
from pneumoscope.data.datasets import to_model_input
from pneumoscope.data.decode import IMAGE_SUFFIXES
from pneumoscope.data.records import ImageRecord, load_folder
from pneumoscope.evaluation.tta import View, tta_logits
from pneumoscope.models.factory import XrayClassifier

log = logging.getLogger(__name__)

UNKNOWN_LABEL = -1
"""Label of an unlabelled film (AdaBN never reads labels)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(root: str | Path, paths: Sequence[str | Path]) -> str:
    """sha256 over the sorted ``(path relative to root, file sha256)`` pairs: the same films
    give the same value wherever the folder lives; any added, removed or changed film changes it."""
    pairs = sorted((Path(os.path.relpath(p, root)).as_posix(), file_sha256(p)) for p in paths)
    h = hashlib.sha256()
    for rel, digest in pairs:
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def load_labelled(data_dir: str | Path, size: int, *, split: str | None = None,
                  cache_dir: str | Path | None = None) -> SplitData:
    """Decoded labelled films of a site folder, in any layout :func:`load_folder` reads
    (``NORMAL/`` and ``PNEUMONIA/`` at any depth, or ``train/val/test`` trees). ``split``
    picks one split of such a tree; by default every labelled film found is used."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"site data folder not found: {data_dir}")
    found = load_folder(data_dir)
    if split is not None:
        if split not in found:
            raise ValueError(f"split {split!r} not found under {data_dir} (found: {', '.join(found)})")
        records = found[split]
    else:
        records = [r for recs in found.values() for r in recs]
    decoded = cached_images(records, size, cache_dir, desc="decoding site films")
    if decoded.failures:
        log.warning("%s: %d unreadable film(s) skipped", data_dir, len(decoded.failures))
    return decoded


def find_images(root: str | Path) -> list[ImageRecord]:
    """Every image file under ``root`` (any folder layout; class folders, if any, ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"site data folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images found under {root} (looked for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))} files at any depth)")
    return [ImageRecord(str(p), UNKNOWN_LABEL, "site", p.stem) for p in paths]


def predict_logits(model: XrayClassifier, images: np.ndarray, *, batch_size: int = 64,
                   calibrated: bool = False, tta: Sequence[View] | None = None) -> np.ndarray:
    """Logits (float32, (N,)) of uint8 (N, S, S) images, in eval mode. ``calibrated=False``
    gives the raw logits (temperature 1), which is what temperature fitting needs. ``tta``:
    the mean logit over these views (a model file whose threshold was chosen under TTA)."""
    device = next(model.parameters()).device
    was_training = model.training
    temperature = float(model.temperature)
    model.eval()
    if not calibrated:
        model.set_temperature(1.0)
    out = np.empty(len(images), dtype=np.float32)
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = to_model_input(images[start:start + batch_size]).to(device)
                logits = tta_logits(model, x, tta) if tta else model(x)
                out[start:start + len(x)] = logits.float().squeeze(1).cpu().numpy()
    finally:
        model.set_temperature(temperature)
        model.train(was_training)
    return out


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logit / T)`` in float32 like the model's own forward (so a threshold picked
    here reproduces at serving time), returned as float64 like ``predict_proba``."""
    z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    t = torch.tensor(float(temperature), dtype=torch.float32)
    return torch.sigmoid(z / t).numpy().astype(np.float64)


def check_output(checkpoint: Path, out: Path, overwrite: bool) -> None:
    """A step on a model file (calibrate, adapt, threshold-oof) writes a new file: never the
    input, an existing file only when asked."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if out.resolve() == checkpoint.resolve() or (out.exists() and out.samefile(checkpoint)):
        raise ValueError(f"out {out} is the input checkpoint: this step writes a new file and "
                         "never modifies the original; choose another --out")
    if out.suffix != ".safetensors":
        raise ValueError(f"out must end in .safetensors, got {out}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")


def provenance_entry(step: str, checkpoint: Path, site_dir: Path | None, *, command: str | None,
                     **fields: Any) -> dict[str, Any]:
    """The common head of a provenance step: what ran, when, on which file, with which code
    (and on which site's films, for a site step)."""
    return {
        "step": step,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(sys.argv) if command is None else command,
        "pneumoscope_version": __version__,
        "source_checkpoint": {"file": checkpoint.name, "sha256": file_sha256(checkpoint)},
        **({"site_dir": str(site_dir)} if site_dir is not None else {}),
        **fields,
    }
