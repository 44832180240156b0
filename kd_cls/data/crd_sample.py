"""CRD's instance-sample wrapper: each training item carries its index and its contrast set.

``ContrastiveSampleDataset(base, targets, k, mode)`` wraps any dataset whose
items start with ``(image, target)`` and yields
``(image, target, index, contrastive_index)``, where ``contrastive_index`` is an
int64 array of ``k + 1`` dataset indices: the positive first, then ``k``
negatives drawn uniformly from the images of the other classes (with
replacement when ``k`` exceeds their number, as mdistiller does).

``mode``: ``"exact"`` takes the image itself as its positive; ``"relax"`` any
image of the same class.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["ContrastiveSampleDataset", "CONTRAST_MODES"]

CONTRAST_MODES = ("exact", "relax")


class ContrastiveSampleDataset(Dataset):
    def __init__(self, base: Dataset, targets: Sequence[int], k: int, mode: str = "exact"):
        if mode not in CONTRAST_MODES:
            raise ValueError(f"CRD.MODE {mode!r} is not valid; choose one of {', '.join(CONTRAST_MODES)}")
        if int(k) < 1:
            raise ValueError(f"CRD.NCE.K must be >= 1, got {k}")
        labels = np.asarray([int(t) for t in targets], dtype=np.int64)
        if len(labels) != len(base):
            raise ValueError(f"{len(labels)} targets for a dataset of {len(base)} items")
        self.base = base
        self.k = int(k)
        self.mode = mode
        self.labels = labels
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        bounds = list(starts) + [len(labels)]
        self.cls_positive: Dict[int, np.ndarray] = {
            int(c): order[bounds[i]:bounds[i + 1]] for i, c in enumerate(classes)
        }
        # Negatives of class c are all indices outside [start_c, end_c) of ``order``;
        # drawing a position in the complement avoids one array of N - n_c per class.
        self._order = order
        self._span = {int(c): (bounds[i], bounds[i + 1]) for i, c in enumerate(classes)}
        for c, (a, b) in self._span.items():
            if b - a == len(labels):
                raise ValueError(f"CRD needs at least two classes; every image has class {c}")

    def __len__(self) -> int:
        return len(self.base)

    def negatives(self, target: int, rng=np.random) -> np.ndarray:
        """``k`` indices of images whose class is not ``target``."""
        a, b = self._span[int(target)]
        n_neg = len(self.labels) - (b - a)
        replace = self.k > n_neg
        pos = rng.choice(n_neg, self.k, replace=replace)
        pos = np.where(pos >= a, pos + (b - a), pos)  # skip the class's own block
        return self._order[pos]

    def __getitem__(self, index: int):
        item = self.base[index]
        img, target = item[0], int(item[1])
        if self.mode == "exact":
            pos_idx = index
        else:
            pos_idx = int(np.random.choice(self.cls_positive[target], 1)[0])
        sample_idx = np.concatenate([np.asarray([pos_idx], dtype=np.int64), self.negatives(target)])
        return img, target, index, sample_idx


def targets_of(dataset) -> List[int]:
    """Class index of every item of an ``ImageFolder``-like dataset (``.samples``) or one with ``.targets``."""
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    return [int(t) for _, t in dataset.samples]
