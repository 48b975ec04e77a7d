"""One synthetic training step (batch augmentation + forward + BCE + backward + AdamW), as
``pneumoscope train`` runs it, for the benchmarks that time or profile a step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pneumoscope.data.augment import BatchAugment
from pneumoscope.models.factory import build_model


def training_step(model_name: str, size: int, batch: int, *, bf16: bool,
                  channels_last: bool = True, compile: bool = False,
                  seed: int = 0) -> Callable[[], float]:
    """A closure running one training step on a fixed random batch; it returns the loss."""
    torch.manual_seed(seed)
    model = build_model(model_name, "none", image_size=size, channels_last=channels_last).train()
    augment = BatchAugment()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 1, size, size), (torch.rand(batch) < 0.7).float()
    forward = torch.compile(model) if compile else model

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(augment(x)).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    return step
