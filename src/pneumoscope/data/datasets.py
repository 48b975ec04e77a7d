"""From a data root (or a PneumoniaMNIST .npz) to decoded splits and Lightning data loaders."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from pneumoscope.config import DataConfig
from pneumoscope.data.cache import SplitData, cached_images
from pneumoscope.data.records import ImageRecord, attach_manifest, load_folder
from pneumoscope.data.splits import make_splits, subsample

log = logging.getLogger(__name__)

__all__ = ["BalancedSampler", "SplitData", "XrayDataModule", "class_weights", "load_pneumoniamnist",
           "load_splits", "to_model_input", "to_model_input_numpy"]

NPZ_SPLITS = ("train", "val", "test")


def load_pneumoniamnist(path: str | Path, size: int,
                        only: Collection[str] = NPZ_SPLITS) -> dict[str, SplitData]:
    """Read a MedMNIST ``pneumoniamnist.npz`` (official splits kept) resized to ``size``;
    ``only``: just these splits (e.g. ``("train",)``: the test images are never decoded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PneumoniaMNIST file not found: {path}")
    with np.load(path) as npz:
        missing = [f"{s}_{k}" for s in only for k in ("images", "labels")
                   if f"{s}_{k}" not in npz]
        if missing:
            raise ValueError(f"{path} is not a PneumoniaMNIST file: missing keys {missing}")
        out = {}
        for split in (s for s in NPZ_SPLITS if s in only):
            raw = npz[f"{split}_images"]
            labels = npz[f"{split}_labels"].reshape(-1).astype(int)
            if raw.ndim != 3 or len(raw) != len(labels):
                raise ValueError(f"{path}: {split}_images must be (N, H, W) matching the labels")
            images = np.stack([
                np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
                for img in raw.astype(np.uint8)
            ]) if raw.shape[1:] != (size, size) else raw.astype(np.uint8)
            # No patient ids in MedMNIST: each image is its own group.
            records = [ImageRecord(f"{path.name}#{split}/{i}", int(y), split, f"{split}-{i}")
                       for i, y in enumerate(labels)]
            out[split] = SplitData(images, records)
    return out


def load_splits(config: DataConfig, seed: int, only: Collection[str] | None = None) -> dict[str, SplitData]:
    """Resolve ``config.root`` into decoded train/val/test splits.

    Folders: validation is a patient-grouped share of the train pool, the official test split
    stays as it is. PneumoniaMNIST: its official splits. ``only``: decode just these splits
    (e.g. ``("val",)``: a check on validation films never reads a test image).
    """
    if config.root is None:
        raise ValueError("data.root is not set: pass --data PATH (or run `pneumoscope data download`)")
    root = Path(config.root)
    if root.suffix == ".npz":
        splits = load_pneumoniamnist(root, config.image_size, NPZ_SPLITS if only is None else only)
    else:
        found = load_folder(root)
        chosen = make_splits(found, config.val_fraction, seed)
        if config.subset < 1.0:
            for name in ("train", "val"):
                chosen[name] = subsample(chosen[name], config.subset, seed)
        if config.manifest:
            chosen = {k: attach_manifest(v, config.manifest) for k, v in chosen.items()}
        splits = {
            name: cached_images(recs, config.image_size, config.cache_dir, desc=f"decoding {name}")
            for name, recs in chosen.items() if recs and (only is None or name in only)
        }
    for name, split in splits.items():
        if split.failures:
            log.warning("%s: %d unreadable image(s) skipped", name, len(split.failures))
        n_pos = int(split.labels.sum())
        log.info("%s: %d images (%d NORMAL, %d PNEUMONIA)", name, len(split.records),
                 len(split.records) - n_pos, n_pos)
    return splits


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (H, W) grayscale → float (N, 1, H, W) in [0, 1], the input every
    PneumoScope model takes (normalisation happens inside the model)."""
    if not isinstance(images, torch.Tensor):
        return torch.from_numpy(to_model_input_numpy(images))  # a copy: memmaps are read-only
    t = images[None] if images.ndim == 2 else images
    return t[:, None].float().div_(255.0)


def to_model_input_numpy(images: np.ndarray) -> np.ndarray:
    """:func:`to_model_input` in numpy, used as is by ONNX Runtime: a torch op between two ORT
    runs wakes torch's own thread pool, which then competes with ORT's threads for the cores."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    return arr[:, None].astype(np.float32) / np.float32(255.0)


class XrayDataset(Dataset):
    """Images from a :class:`SplitData`, as ``(float tensor (1, H, W) in [0, 1], label)``.

    Augmentation is not done here but per batch on the device (:mod:`pneumoscope.data.augment`).
    """

    def __init__(self, split: SplitData) -> None:
        self.images = split.images
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_input(self.images[i])[0]
        return x, torch.tensor(float(self.labels[i]))


def class_weights(labels: np.ndarray) -> tuple[float, float]:
    """Weights ``N / (2 * N_c)`` for NORMAL and PNEUMONIA, so each class carries half the loss."""
    n = len(labels)
    counts = np.bincount(labels, minlength=2)
    if (counts == 0).any():
        raise ValueError(f"training data needs both classes, got counts {counts.tolist()}")
    return float(n / (2 * counts[0])), float(n / (2 * counts[1]))


class BalancedSampler(DistributedSampler):
    """Class-balanced sampling with replacement (``weights`` per image), ``len(dataset)`` draws
    per epoch shared out between ``num_replicas`` processes. Like its base class, the draws are
    a function of ``seed + epoch`` (set by Lightning through ``set_epoch``)."""

    def __init__(self, dataset: Dataset, weights: np.ndarray, *, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = torch.as_tensor(weights, dtype=torch.double)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(draws[self.rank:self.total_size:self.num_replicas].tolist())


class XrayDataModule(L.LightningDataModule):
    """Train/val loaders over decoded splits; class balance by sampler when configured.

    The samplers are built here for every process count (Lightning's own sampler injection is
    off, see :func:`pneumoscope.training.train.fit`): the training order is a function of
    ``(seed, epoch)`` alone, so a run resumed at an epoch boundary sees the same batches as an
    uninterrupted one; under DDP each process gets its share of the epoch (padded to equal
    length, as training needs) and an unpadded share of validation, so validation scores
    exactly the split's N images.
    """

    def __init__(self, splits: dict[str, SplitData], config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.splits = splits
        self.config = config
        self.seed = seed

    def _replicas(self) -> tuple[int, int]:
        """(number of processes, this process's rank); (1, 0) outside a trainer."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, **kwargs: object) -> DataLoader:
        return DataLoader(dataset, batch_size=self.config.batch_size,
                          num_workers=self.config.num_workers,
                          persistent_workers=self.config.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        cfg = self.config
        split = self.splits["train"]
        dataset = XrayDataset(split)
        world, rank = self._replicas()
        if cfg.class_balance == "sampler":
            weights = np.array(class_weights(split.labels))[split.labels]
            sampler: DistributedSampler = BalancedSampler(dataset, weights, num_replicas=world,
                                                          rank=rank, seed=self.seed)
        else:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                         seed=self.seed)
        # Dropping a ragged last batch avoids a 1-image BatchNorm batch; tiny sets keep it
        # (per process: under DDP each one sees ~N/devices images).
        return self._loader(dataset, sampler=sampler, drop_last=sampler.num_samples > cfg.batch_size)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._replicas()
        dataset = XrayDataset(self.splits["val"])
        if world > 1:
            if len(dataset) < world:
                raise ValueError(f"{len(dataset)} validation image(s) cannot be shared between "
                                 f"{world} processes: each needs at least one")
            # Every image exactly once across the processes (no padding duplicates).
            return self._loader(Subset(dataset, range(rank, len(dataset), world)))
        return self._loader(dataset)
