"""CIFAR-style augmentation on whole batches, on the training device.

The dataset stays one ``(N, H, W, 3)`` uint8 tensor (on the GPU when there is
one). Each batch is gathered from it, zero-padded by 4 in uint8, randomly
cropped back to 32x32, randomly flipped, then converted and normalized. For
given crop offsets and flip flags the result is bit-identical to torchvision's
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
``Normalize(mean, std)`` applied image by image: the float ops are the same
(``x / 255``, ``- mean``, ``/ std``) in the same order.

This removes the per-image PIL work and the worker processes that dominate
small-model CIFAR training.

A *view* is one outcome of the augmentation, ``(row offset, column offset,
flip)``: CIFAR has 9 x 9 x 2 = 162 of them per image. With ``with_view`` the
loader reports each sample's view id (:meth:`BatchAugment.view_ids`), which
is what lets a teacher's logits be cached per (sample, view).
"""
from __future__ import annotations

from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["BatchAugment", "DeviceLoader", "ViewBatch", "dist_rank_world"]


class ViewBatch(NamedTuple):
    """A training batch that names its extras, so the trainer passes ``view=`` by name."""

    image: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor


def dist_rank_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BatchAugment:
    """Random crop with zero padding, horizontal flip and normalization of uint8 batches.

    Args:
        mean, std: per-channel normalization, as given to ``transforms.Normalize``.
        size: output side (32).
        padding: zero padding on each side before the crop (4).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int = 32, padding: int = 4):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.size = size
        self.padding = padding

    def sample_params(self, n: int, in_size: int, generator: Optional[torch.Generator] = None):
        """Random ``(offsets (n, 2) int64 [row, col], flips (n,) bool)`` on the CPU.

        Offsets index the padded image, ``0 .. in_size + 2 * padding - size``,
        as ``RandomCrop.get_params`` draws them.
        """
        hi = in_size + 2 * self.padding - self.size + 1
        offsets = torch.randint(0, hi, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return offsets, flips

    def num_positions(self, in_size: int) -> int:
        """Crop offsets per axis: ``in_size + 2 * padding - size + 1``."""
        return in_size + 2 * self.padding - self.size + 1

    def num_views(self, in_size: int) -> int:
        """Distinct outcomes of the augmentation of one image: offsets squared, times flip or not."""
        return self.num_positions(in_size) ** 2 * 2

    def view_ids(self, offsets: torch.Tensor, flips: torch.Tensor, in_size: int) -> torch.Tensor:
        """``(row * positions + col) * 2 + flip``: int64 ids in ``[0, num_views)``."""
        m = self.num_positions(in_size)
        return (offsets[:, 0].long() * m + offsets[:, 1].long()) * 2 + flips.long()

    def view_params(self, views: torch.Tensor, in_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``(offsets, flips)`` of view ids: the inverse of :meth:`view_ids`."""
        m = self.num_positions(in_size)
        views = views.long()
        pos = views // 2
        return torch.stack([pos // m, pos % m], dim=1), (views % 2).bool()

    def settings(self, in_size: int) -> Dict:
        """Everything that decides the pixels of a view (part of a teacher cache's key)."""
        return {"mean": list(self.mean), "std": list(self.std), "crop": self.size, "padding": self.padding,
                "flip": True, "in_size": int(in_size), "views": self.num_views(in_size)}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` float32, ``(x / 255 - mean) / std``."""
        x = images.permute(0, 3, 1, 2).float().div(255)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub(mean).div(std)

    def crop_flip(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Pad ``(N, H, W, C)`` uint8 images by ``padding`` zeros, crop at ``offsets``, flip where ``flips``."""
        n = images.shape[0]
        p, s = self.padding, self.size
        padded = F.pad(images, (0, 0, p, p, p, p))  # (N, H+2p, W+2p, C), zeros, still uint8
        dev = images.device
        offsets = offsets.to(dev)
        flips = flips.to(dev)
        ar = torch.arange(s, device=dev)
        rows = offsets[:, :1] + ar  # (N, s)
        cols_ar = torch.where(flips[:, None], s - 1 - ar, ar)  # flip = read columns backwards
        cols = offsets[:, 1:] + cols_ar  # (N, s)
        batch = torch.arange(n, device=dev)[:, None, None]
        return padded[batch, rows[:, :, None], cols[:, None, :]]  # (N, s, s, C)

    def __call__(self, images: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                 flips: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augment and normalize ``(N, H, W, C)`` uint8 images -> ``(N, C, size, size)`` float32.

        Missing ``offsets``/``flips`` are drawn with ``generator``.
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected (N, H, W, C) uint8 images, got {tuple(images.shape)} {images.dtype}")
        if offsets is None or flips is None:
            o, f = self.sample_params(images.shape[0], images.shape[1], generator)
            offsets = o if offsets is None else offsets
            flips = f if flips is None else flips
        return self.normalize(self.crop_flip(images, offsets, flips))


class DeviceLoader:
    """Batches of an in-memory uint8 dataset, augmented on its device.

    Yields ``(image, target)`` or, with ``with_index``, ``(image, target, index)``
    with ``image`` ``(B, 3, 32, 32)`` float32, on the device the data lives on.
    With ``with_view`` too (an attribute a teacher cache switches on), training
    batches are :class:`ViewBatch` es that add each sample's view id.
    Under ``torch.distributed`` each rank takes every ``world``-th sample of the
    shared permutation (padded to equal length when shuffling, as
    ``DistributedSampler`` does); ``batch_size`` is then per rank.

    The order and the augmentation depend only on ``seed``, the epoch given to
    :meth:`set_epoch` and the rank, so a resumed run sees the same batches.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 augment: Optional[BatchAugment], normalizer: BatchAugment, shuffle: bool,
                 with_index: bool = False, seed: int = 0, drop_last: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.images = images
        self.targets = targets.to(images.device)
        self.batch_size = int(batch_size)
        self.augment = augment
        self.normalizer = normalizer
        self.shuffle = shuffle
        self.with_index = with_index
        self.seed = int(seed)
        self.drop_last = drop_last
        r, w = dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.epoch: Optional[int] = None
        self.with_view = False
        self._iters = 0
        self.dataset = images  # len(loader.dataset) as with a DataLoader

    @property
    def num_data(self) -> int:
        return self.images.shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self, epoch: int) -> torch.Tensor:
        n = self.num_data
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            idx = torch.randperm(n, generator=g)
            total = -(-n // self.world_size) * self.world_size
            if total > n:
                idx = torch.cat([idx, idx[: total - n]])
        else:
            idx = torch.arange(n)
        return idx[self.rank :: self.world_size]

    def __len__(self) -> int:
        m = len(range(self.rank, self._padded_len(), self.world_size))
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def _padded_len(self) -> int:
        n = self.num_data
        return -(-n // self.world_size) * self.world_size if self.shuffle else n

    def __iter__(self) -> Iterator[tuple]:
        epoch = self.epoch if self.epoch is not None else self._iters
        self._iters += 1
        idx = self._indices(epoch)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 997 + self.rank + 1)
        dev = self.images.device
        for start in range(0, len(idx), self.batch_size):
            bidx = idx[start : start + self.batch_size]
            if self.drop_last and len(bidx) < self.batch_size:
                break
            bidx_dev = bidx.to(dev)
            raw = self.images.index_select(0, bidx_dev)
            target = self.targets.index_select(0, bidx_dev)
            if self.augment is None:
                img = self.normalizer.normalize(raw)
            else:  # the draws BatchAugment.__call__ would make itself, kept to report the views
                offsets, flips = self.augment.sample_params(raw.shape[0], raw.shape[1], g)
                img = self.augment(raw, offsets, flips)
                if self.with_view and self.with_index:
                    yield ViewBatch(img, target, bidx_dev, self.augment.view_ids(offsets, flips, raw.shape[1]).to(dev))
                    continue
            yield (img, target, bidx_dev) if self.with_index else (img, target)
