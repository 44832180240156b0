"""CIFAR-100 from torchvision's python-format files under ``DATASET.ROOT`` (``./data``).

Expects ``<root>/cifar-100-python/{train,test}`` (the extracted
``cifar-100-python.tar.gz``). Nothing is downloaded; a missing file stops the
run with a message that says where to put it. Transforms are mdistiller's:
training ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` +
``Normalize``, test ``Normalize``, with the mean/std below.
"""
from __future__ import annotations

import functools
import os
import pickle

import numpy as np

from .array_loaders import build_array_loaders, build_array_val_loader
from .registry import DatasetInfo, register_dataset

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
NUM_CLASSES = 100
FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def _split_path(root: str, split: str) -> str:
    path = os.path.join(root, FOLDER, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CIFAR-100 not found: {path} is missing; download {URL} and extract it into {root} "
            f"(it creates {os.path.join(root, FOLDER)}); no download is attempted"
        )
    return path


@functools.lru_cache(maxsize=4)
def _load_split(path: str):
    # The dataset's own format is a pickle of numpy arrays and lists (as torchvision reads it).
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    data = np.ascontiguousarray(data)
    targets = np.asarray(entry["fine_labels"], dtype=np.int64)
    data.setflags(write=False)
    targets.setflags(write=False)
    return data, targets


def load_cifar100(root: str, split: str):
    """``(images (N, 32, 32, 3) uint8, targets (N,) int64)`` of ``split`` in ``{"train", "test"}``."""
    return _load_split(os.path.abspath(_split_path(root, split)))


def build(cfg, with_contrastive: bool = False):
    root = cfg.DATASET.ROOT
    _split_path(root, "test")  # fail before reading 150 MB when the test half is missing
    xtr, ytr = load_cifar100(root, "train")
    xte, yte = load_cifar100(root, "test")
    return build_array_loaders(cfg, xtr, ytr, xte, yte, MEAN, STD, NUM_CLASSES, with_contrastive)


def build_val(cfg, batch_size: int):
    xte, yte = load_cifar100(cfg.DATASET.ROOT, "test")
    n = int(cfg.DATASET.SUBSET)
    if n > 0:
        xte, yte = xte[:n], yte[:n]
    return build_array_val_loader(cfg, xte, yte, MEAN, STD, batch_size)


INFO = register_dataset(DatasetInfo("cifar100", NUM_CLASSES, 50000, 32, "cifar", build=build, build_val=build_val))
