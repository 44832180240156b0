"""Per-image reference transforms (torchvision) and the datasets they run on.

The training pipeline of CIFAR-100 and digits is mdistiller's:
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
``Normalize(mean, std)``; the test pipeline is ``ToTensor()`` +
``Normalize``. ``kd_cls.data.batch_aug`` computes the same thing on whole
batches; these per-image versions remain the reference (and the path used
with ``DATASET.BATCH_AUG False`` or a CRD sampler).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

__all__ = ["make_train_transform", "make_test_transform", "UInt8ImageDataset"]


def make_train_transform(mean: Sequence[float], std: Sequence[float], size: int = 32, padding: int = 4):
    return transforms.Compose(
        [
            transforms.RandomCrop(size, padding=padding),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def make_test_transform(mean: Sequence[float], std: Sequence[float]):
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


class UInt8ImageDataset(Dataset):
    """Images held as one ``(N, H, W, 3)`` uint8 array, served as PIL images through ``transform``.

    ``__getitem__`` returns ``(image, target)``, or ``(image, target, index)``
    with ``with_index`` (mdistiller's ``CIFAR100Instance``).
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform: Optional[Callable] = None,
                 with_index: bool = False):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        self.data = images
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        target = self.targets[index]
        if self.with_index:
            return img, target, index
        return img, target


def as_tensor_dataset(images: np.ndarray, targets: Sequence[int]):
    """``(uint8 (N, H, W, 3) tensor, int64 (N,) tensor)`` from numpy arrays."""
    return torch.from_numpy(np.array(images, copy=True)), torch.tensor(np.asarray(targets), dtype=torch.long)
