"""Batched probabilities from a model over decoded images (evaluate, predict and serve use it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pneumoscope.data.datasets import to_model_input
from pneumoscope.evaluation.tta import View, tta_logits
from pneumoscope.models.ensemble import Classifier


@torch.inference_mode()
def predict_proba(
    model: Classifier, images: np.ndarray, *, batch_size: int = 64,
    device: str | torch.device | None = None, progress: bool = False,
    tta: Sequence[View] | None = None,
) -> np.ndarray:
    """Probability of PNEUMONIA for each uint8 (N, S, S) image, as float64 (N,).

    ``tta``: views (:mod:`pneumoscope.evaluation.tta`, e.g. ``TTA_VIEWS``) whose logits are
    averaged before the sigmoid; ``None`` or empty: the image as it is.
    """
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty(len(images), dtype=np.float64)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress, leave=False):
        x = to_model_input(images[start:start + batch_size]).to(device)
        logits = tta_logits(model, x, tta) if tta else model(x)
        out[start:start + len(x)] = torch.sigmoid(logits.float()).squeeze(1).cpu().numpy()
    model.train(was_training)
    return out
