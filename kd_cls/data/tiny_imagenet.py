"""Tiny-ImageNet (200 classes, 64x64) at ``<DATASET.ROOT>/tiny-imagenet-200``.

The extracted ``tiny-imagenet-200.zip`` as distributed::

    train/<wnid>/images/*.JPEG        500 images per class
    val/images/*.JPEG                 10,000 images
    val/val_annotations.txt           "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per line

The validation labels are read from ``val_annotations.txt``; a ``val/`` already
sorted into ``<wnid>/`` folders (what mdistiller's loader expects) works too.
Class indices follow the sorted train folder names, as ``ImageFolder`` gives them.

Transforms are mdistiller's: training ``RandomRotation(20)`` +
``RandomHorizontalFlip(0.5)`` + ``Normalize``; test ``Normalize`` only.
"""
from __future__ import annotations

import os
from typing import List, Tuple

from torchvision import transforms

from .imagenet import class_folders, folder_samples, make_loaders, require_dir, subset, SampleListDataset
from .array_loaders import torch_loader
from .registry import DatasetInfo, register_dataset

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
NUM_CLASSES = 200
NUM_TRAIN = 100000
FOLDER = "tiny-imagenet-200"
ANNOTATIONS = "val_annotations.txt"
SOURCE = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
NAME = "Tiny-ImageNet"


def train_transform(mean=MEAN, std=STD):
    return transforms.Compose([
        transforms.RandomRotation(20),
        transforms.RandomHorizontalFlip(0.5),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def test_transform(mean=MEAN, std=STD):
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def _root(cfg) -> str:
    return require_dir(os.path.join(cfg.DATASET.ROOT, FOLDER), NAME, SOURCE)


def _class_to_idx(root: str) -> dict:
    train = require_dir(os.path.join(root, "train"), NAME, SOURCE)
    return {c: i for i, c in enumerate(class_folders(train, NAME, SOURCE))}


def val_samples(root: str, class_to_idx: dict) -> List[Tuple[str, int]]:
    """``(path, class_index)`` of the validation images, from the annotations file or class folders."""
    val = require_dir(os.path.join(root, "val"), NAME, SOURCE)
    ann = os.path.join(val, ANNOTATIONS)
    if os.path.isfile(ann):
        samples = []
        with open(ann) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.strip().split("\t")
                if not parts or parts == [""]:
                    continue
                if len(parts) < 2:
                    raise ValueError(f"{ann}:{lineno}: expected '<file>\\t<wnid>\\t...', got {line.strip()!r}")
                fname, wnid = parts[0], parts[1]
                if wnid not in class_to_idx:
                    raise ValueError(f"{ann}:{lineno}: class {wnid!r} is not a train class folder")
                path = os.path.join(val, "images", fname)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{NAME}: {path} is listed in {ann} but missing")
                samples.append((path, class_to_idx[wnid]))
        return sorted(samples)
    folders = [e.name for e in os.scandir(val) if e.is_dir() and e.name in class_to_idx]
    if not folders:
        raise FileNotFoundError(f"{NAME}: {ann} is missing and {val} has no class folders; "
                                f"get the dataset from {SOURCE}")
    return folder_samples(val, class_to_idx)


def build(cfg, with_contrastive: bool = False):
    root = _root(cfg)
    class_to_idx = _class_to_idx(root)
    train = folder_samples(os.path.join(root, "train"), class_to_idx)
    return make_loaders(cfg, train, val_samples(root, class_to_idx), train_transform(), test_transform(),
                        NUM_CLASSES, with_contrastive)


def build_val(cfg, batch_size: int):
    root = _root(cfg)
    samples = subset(val_samples(root, _class_to_idx(root)), int(cfg.DATASET.SUBSET))
    return torch_loader(SampleListDataset(samples, test_transform()), batch_size, shuffle=False,
                        num_workers=int(cfg.DATASET.NUM_WORKERS))


INFO = register_dataset(DatasetInfo("tiny_imagenet", NUM_CLASSES, NUM_TRAIN, 64, "tiny_imagenet", build=build,
                                    build_val=build_val))
