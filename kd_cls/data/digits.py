"""``digits``: scikit-learn's handwritten digits as a tiny CIFAR-like dataset (the embedded default).

1,797 real 8x8 grey images of the digits 0-9 (UCI ML hand-written digits,
shipped inside scikit-learn, so nothing is downloaded):

* values 0..16 are scaled to 0..1, upsampled to 32x32 with bilinear
  interpolation (``F.interpolate(mode="bilinear", align_corners=False)``),
  stored as uint8 (``round(255 * x)``) and copied to 3 channels;
* a fixed stratified 80/20 split (``train_test_split(test_size=0.2,
  stratify=y, random_state=0)``): 1,437 training and 360 test images;
* CIFAR's augmentation (pad 4 + random crop 32, horizontal flip) and a
  normalization with the training split's statistics, mean 0.3054 and std
  0.3237 on every channel.

Flipping digits is not natural, but keeps the pipeline the CIFAR one; the
models reach well over 90% anyway.
"""
from __future__ import annotations

import functools

import numpy as np

from .array_loaders import build_array_loaders, build_array_val_loader
from .registry import DatasetInfo, register_dataset

MEAN = (0.3054, 0.3054, 0.3054)
STD = (0.3237, 0.3237, 0.3237)
NUM_CLASSES = 10
NUM_TRAIN = 1437
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def load_digits_split():
    """``(train_images, train_targets, test_images, test_targets)``; images ``(N, 32, 32, 3)`` uint8."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x = torch.from_numpy(raw.images).float().div(16.0)  # (N, 8, 8) in 0..1
    x = F.interpolate(x[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    u8 = x.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    images = np.repeat(u8[..., None], 3, axis=-1)  # (N, 32, 32, 3)
    targets = raw.target.astype(np.int64)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.2, stratify=targets, random_state=SPLIT_SEED)
    for a in (images, targets):
        a.setflags(write=False)
    return images[tr], targets[tr], images[te], targets[te]


def build(cfg, with_contrastive: bool = False):
    xtr, ytr, xte, yte = load_digits_split()
    return build_array_loaders(cfg, xtr, ytr, xte, yte, MEAN, STD, NUM_CLASSES, with_contrastive)


def build_val(cfg, batch_size: int):
    _, _, xte, yte = load_digits_split()
    n = int(cfg.DATASET.SUBSET)
    if n > 0:
        xte, yte = xte[:n], yte[:n]
    return build_array_val_loader(cfg, xte, yte, MEAN, STD, batch_size)


INFO = register_dataset(DatasetInfo("digits", NUM_CLASSES, NUM_TRAIN, 32, "cifar", build=build, build_val=build_val))
