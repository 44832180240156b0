"""Loaders for small datasets held in memory as uint8 arrays (CIFAR-100, digits).

``build_array_loaders`` returns the ``(train_loader, val_loader, num_data,
num_classes)`` tuple of ``DatasetInfo.build``. By default
(``DATASET.BATCH_AUG True``) both loaders are ``DeviceLoader``s that augment on
the training device; otherwise, and for CRD's contrastive sampling, they are
torch ``DataLoader``s over PIL images with the reference transforms.

``SOLVER.BATCH_SIZE`` is the global batch, as with mdistiller's DataParallel:
under ``torchrun`` each of the W processes takes ``BATCH_SIZE // W``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .batch_aug import BatchAugment, DeviceLoader, dist_rank_world
from .transforms import UInt8ImageDataset, as_tensor_dataset, make_test_transform, make_train_transform

__all__ = ["build_array_loaders", "data_device", "per_rank_batch_size"]


def data_device() -> torch.device:
    """Where in-memory datasets live: the current CUDA device if any, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def per_rank_batch_size(global_batch: int) -> int:
    _, world = dist_rank_world()
    if global_batch < world:
        raise ValueError(f"SOLVER.BATCH_SIZE {global_batch} is smaller than the number of processes {world}")
    return global_batch // world


def _subset(images, targets, n: int):
    if n and n > 0:
        return images[:n], list(targets)[:n]
    return images, list(targets)


def build_array_loaders(cfg, train_images: np.ndarray, train_targets: Sequence[int], test_images: np.ndarray,
                        test_targets: Sequence[int], mean, std, num_classes: int, with_contrastive: bool = False):
    """Build ``(train_loader, val_loader, num_data, num_classes)`` from ``(N, H, W, 3)`` uint8 arrays.

    Training batches carry the sample index (``(image, target, index)``), as
    mdistiller's ``CIFAR100Instance``; CRD batches add ``contrastive_index``.
    """
    n_sub = int(cfg.DATASET.SUBSET)
    train_images, train_targets = _subset(train_images, train_targets, n_sub)
    test_images, test_targets = _subset(test_images, test_targets, n_sub)
    num_data = len(train_images)
    batch = per_rank_batch_size(int(cfg.SOLVER.BATCH_SIZE))
    val_batch = int(cfg.DATASET.TEST.BATCH_SIZE)
    seed = int(cfg.EXPERIMENT.SEED)

    if with_contrastive:
        train_loader = _contrastive_loader(cfg, train_images, train_targets, mean, std, batch, seed)
    elif cfg.DATASET.BATCH_AUG:
        x, y = as_tensor_dataset(train_images, train_targets)
        dev = data_device()
        train_loader = DeviceLoader(x.to(dev), y, batch, BatchAugment(mean, std), BatchAugment(mean, std),
                                    shuffle=True, with_index=True, seed=seed)
    else:
        ds = UInt8ImageDataset(train_images, train_targets, make_train_transform(mean, std), with_index=True)
        train_loader = torch_loader(ds, batch, shuffle=True, num_workers=int(cfg.DATASET.NUM_WORKERS), seed=seed)

    val_loader = build_array_val_loader(cfg, test_images, test_targets, mean, std, val_batch)
    return train_loader, val_loader, num_data, num_classes


def build_array_val_loader(cfg, images: np.ndarray, targets: Sequence[int], mean, std, batch_size: int):
    """Unshuffled ``(image, target)`` batches; under ``torch.distributed`` each rank gets a disjoint shard."""
    if cfg.DATASET.BATCH_AUG:
        x, y = as_tensor_dataset(images, targets)
        return DeviceLoader(x.to(data_device()), y, batch_size, None, BatchAugment(mean, std), shuffle=False)
    ds = UInt8ImageDataset(images, targets, make_test_transform(mean, std))
    return torch_loader(ds, batch_size, shuffle=False, num_workers=int(cfg.DATASET.NUM_WORKERS))


class _EvalShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + W, ...``: disjoint shards that cover the set exactly once."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return len(range(self.rank, self.n, self.world))


def torch_loader(dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` that shards over ``torch.distributed`` ranks when there are several."""
    rank, world = dist_rank_world()
    sampler = None
    if world > 1:
        sampler = (DistributedSampler(dataset, world, rank, shuffle=True, seed=seed) if shuffle
                   else _EvalShardSampler(len(dataset), rank, world))
    gen = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=gen, persistent_workers=num_workers > 0)


def _contrastive_loader(cfg, images, targets, mean, std, batch: int, seed: int):
    try:
        from kd_cls.data.crd_sample import ContrastiveSampleDataset
    except ImportError as e:
        raise RuntimeError(f"CRD needs kd_cls.data.crd_sample, which is not available: {e}") from None
    base = UInt8ImageDataset(images, targets, make_train_transform(mean, std))
    ds = ContrastiveSampleDataset(base, list(targets), k=int(cfg.CRD.NCE.K), mode=str(cfg.CRD.MODE))
    return torch_loader(ds, batch, shuffle=True, num_workers=int(cfg.DATASET.NUM_WORKERS), seed=seed)
