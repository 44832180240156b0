"""ImageNet (ILSVRC-2012) as an ImageFolder tree at ``<DATASET.ROOT>/imagenet/{train,val}``.

Each split holds one folder per class (``n01440764/...JPEG``); the validation
images must be sorted into class folders the same way. Transforms are
mdistiller's: training ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` +
``Normalize``; test ``Resize(256)`` + ``CenterCrop(224)`` + ``Normalize``.

Training batches are ``(image, target, index)`` (mdistiller's ``ImageNet``),
plus ``contrastive_index`` for CRD. The folder helpers here are shared with
``tiny_imagenet``.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

from .array_loaders import per_rank_batch_size, torch_loader
from .registry import DatasetInfo, register_dataset

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 1000
NUM_TRAIN = 1281167
FOLDER = "imagenet"
SOURCE = "https://image-net.org/ (ILSVRC-2012 train and val, val sorted into class folders)"


def train_transform(mean=MEAN, std=STD):
    return transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def test_transform(mean=MEAN, std=STD):
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class SampleListDataset(Dataset):
    """Images from a list of ``(path, class_index)``; items ``(image, target)`` or ``(image, target, index)``."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable] = None,
                 with_index: bool = False, loader: Callable[[str], Image.Image] = default_loader):
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.with_index = with_index
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        return (img, target, index) if self.with_index else (img, target)


def require_dir(path: str, dataset: str, source: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{dataset} not found: {path} is missing; get it from {source} "
                                f"(DATASET.ROOT sets the parent folder)")
    return path


def class_folders(split_dir: str, dataset: str, source: str) -> List[str]:
    """Sorted class folder names of ``split_dir``; an error when there are none."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{dataset}: {split_dir} has no class folders; expected <class>/<image> "
                                f"as in {source}")
    return classes


def folder_samples(split_dir: str, class_to_idx: dict) -> List[Tuple[str, int]]:
    """``(path, class_index)`` of every image under the class folders of ``split_dir``, sorted."""
    return make_dataset(split_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


def subset(samples: List[Tuple[str, int]], n: int) -> List[Tuple[str, int]]:
    """``n`` samples spread evenly over the (class-sorted) list, so several classes remain; all if ``n <= 0``."""
    if n <= 0 or n >= len(samples):
        return samples
    idx = np.linspace(0, len(samples) - 1, n).round().astype(int)
    return [samples[i] for i in idx]


def make_loaders(cfg, train_samples, val_samples, train_tf, test_tf, num_classes: int, with_contrastive: bool):
    """``(train_loader, val_loader, num_data, num_classes)`` over lists of ``(path, target)``."""
    n_sub = int(cfg.DATASET.SUBSET)
    train_samples = subset(train_samples, n_sub)
    val_samples = subset(val_samples, n_sub)
    batch = per_rank_batch_size(int(cfg.SOLVER.BATCH_SIZE))
    workers = int(cfg.DATASET.NUM_WORKERS)
    seed = int(cfg.EXPERIMENT.SEED)
    if with_contrastive:
        from .crd_sample import ContrastiveSampleDataset

        base = SampleListDataset(train_samples, train_tf)
        train_set = ContrastiveSampleDataset(base, base.targets, k=int(cfg.CRD.NCE.K), mode=str(cfg.CRD.MODE))
    else:
        train_set = SampleListDataset(train_samples, train_tf, with_index=True)
    train_loader = torch_loader(train_set, batch, shuffle=True, num_workers=workers, seed=seed)
    val_loader = torch_loader(SampleListDataset(val_samples, test_tf), int(cfg.DATASET.TEST.BATCH_SIZE),
                              shuffle=False, num_workers=workers)
    return train_loader, val_loader, len(train_samples), num_classes


def _splits(cfg) -> Tuple[str, str]:
    root = require_dir(os.path.join(cfg.DATASET.ROOT, FOLDER), "ImageNet", SOURCE)
    train = require_dir(os.path.join(root, "train"), "ImageNet", SOURCE)
    val = require_dir(os.path.join(root, "val"), "ImageNet", SOURCE)
    return train, val


def _val_samples(val_dir: str, class_to_idx: dict):
    classes = class_folders(val_dir, "ImageNet", SOURCE)
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise ValueError(f"ImageNet: val class folders {unknown[:5]} are not among the train classes")
    return folder_samples(val_dir, class_to_idx)


def build(cfg, with_contrastive: bool = False):
    train_dir, val_dir = _splits(cfg)
    classes = class_folders(train_dir, "ImageNet", SOURCE)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return make_loaders(cfg, folder_samples(train_dir, class_to_idx), _val_samples(val_dir, class_to_idx),
                        train_transform(), test_transform(), NUM_CLASSES, with_contrastive)


def build_val(cfg, batch_size: int):
    root = os.path.join(cfg.DATASET.ROOT, FOLDER)
    val_dir = require_dir(os.path.join(root, "val"), "ImageNet", SOURCE)
    # Class indices follow the train folder names when present (the models were trained with them).
    train_dir = os.path.join(root, "train")
    names_dir = train_dir if os.path.isdir(train_dir) else val_dir
    class_to_idx = {c: i for i, c in enumerate(class_folders(names_dir, "ImageNet", SOURCE))}
    samples = subset(_val_samples(val_dir, class_to_idx), int(cfg.DATASET.SUBSET))
    return torch_loader(SampleListDataset(samples, test_transform()), batch_size, shuffle=False,
                        num_workers=int(cfg.DATASET.NUM_WORKERS))


INFO = register_dataset(DatasetInfo("imagenet", NUM_CLASSES, NUM_TRAIN, 224, "imagenet", build=build,
                                    build_val=build_val))
