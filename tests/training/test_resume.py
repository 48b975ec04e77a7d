"""Resume gives the same model: a run interrupted mid-epoch and resumed from its last
checkpoint ends bit-identical (every weight, every metrics.json number) to an uninterrupted run
with the same seed, on the CPU."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.config import load_config
from pneumoscope.pipeline import train

# Dropout (model.drop_rate) and augmentation on, so both random streams are exercised.
TINY = ("model.name=resnet18", "model.weights=none", "data.image_size=32", "data.batch_size=8",
        "data.augment=texture", "train.epochs=3", "train.patience=3", "eval.n_bootstrap=0",
        "eval.stress_test=false", "eval.fit_gate=false", "tracking.enabled=false")


class Kill(L.Callback):
    """Stands in for ``kill -9``: stops the process's training after ``at_step`` optimiser steps,
    leaving the run folder as a killed run leaves it."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated kill")


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pneumoscope.data.synthetic import write_kermany_tree

    counts = {"train": (14, 18), "val": (6, 6), "test": (6, 6)}
    return write_kermany_tree(tmp_path_factory.mktemp("resume") / "xray", counts, size=40, seed=3)


def _config(tree: Path, out: Path):
    return load_config(dotted=[f"data.root={tree}", f"out={out}", *TINY])


def _metrics(run: Path) -> dict:
    summary = json.loads((run / "metrics.json").read_text())
    summary.pop("wall_time_s")
    return summary


def _last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _epochs(run: Path) -> list[dict[str, str]]:
    with open(run / "epochs.csv") as fh:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(fh)]


def test_resume_after_a_mid_epoch_kill_gives_the_same_model(tiny_tree: Path, tmp_path: Path) -> None:
    straight = train(_config(tiny_tree, tmp_path / "straight"), progress=False).run_dir
    # 38 training images in batches of 8: 4 steps per epoch; step 6 is in the middle of epoch 1.
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_config(tiny_tree, tmp_path / "killed"), progress=False, callbacks=[Kill(6)])
    killed = tmp_path / "killed" / straight.name
    assert not (killed / "metrics.json").exists() and len(_epochs(killed)) == 1
    train(_config(tiny_tree, tmp_path / "killed"), resume=True, progress=False)

    # The model file holds the best validation epoch; last.ckpt the weights after the last one.
    for a, b in ((load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")),
                 (_last_weights(straight), _last_weights(killed))):
        assert a.keys() == b.keys()
        different = [name for name in a if not torch.equal(a[name], b[name])]
        assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert _metrics(straight) == _metrics(killed)
    assert _epochs(straight) == _epochs(killed) and len(_epochs(killed)) == 3


def test_training_order_is_a_function_of_seed_and_epoch(tiny_tree: Path) -> None:
    from pneumoscope.data.datasets import XrayDataModule, load_splits

    config = _config(tiny_tree, Path("unused"))
    splits = load_splits(config.data, 0)

    def order(epoch: int, seed: int = 0) -> list[float]:
        loader = XrayDataModule(splits, config.data, seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [float(x.sum()) for batch, _ in loader for x in batch]

    # A fresh loader (as after a resume) replays epoch 1's order, not epoch 0's.
    assert order(1) == order(1) != order(0)
    assert order(1, seed=1) != order(1)
