"""Batched probabilities from a model over decoded images (evaluate, predict and serve use it)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from pneumoscope.data.datasets import to_model_input
from pneumoscope.models.factory import XrayClassifier


@torch.inference_mode()
def predict_proba(
    model: XrayClassifier, images: np.ndarray, *, batch_size: int = 64,
    device: str | torch.device | None = None, progress: bool = False,
) -> np.ndarray:
    """Probability of PNEUMONIA for each uint8 (N, S, S) image, as float64 (N,)."""
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty(len(images), dtype=np.float64)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress, leave=False):
        x = to_model_input(images[start:start + batch_size]).to(device)
        out[start:start + len(x)] = torch.sigmoid(model(x).float()).squeeze(1).cpu().numpy()
    model.train(was_training)
    return out
