"""The teacher-logit cache in a run (``SOLVER.TEACHER_CACHE``), and the fill behind ``tools/cache_teacher.py``.

A run whose method reads only the teacher's logits (``teacher_logits_only``:
KD, DKD, under any trainer) and whose data has a finite augmentation (the
CIFAR-style batch augmentation) gets a :class:`kd_cls.nn.teacher_cache.TeacherLogitCache`:
its loader then reports each sample's view and the distiller runs the teacher
on the misses only. Any other run logs one line saying why the cache is not
used, and goes on without it.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from kd_cls.config import ConfigError
from kd_cls.data import get_dataset_info
from kd_cls.data.batch_aug import DeviceLoader
from kd_cls.distillers import DISTILLERS
from kd_cls.models.pretrained import load_teacher
from kd_cls.nn.teacher import FrozenTeacher
from kd_cls.nn.teacher_cache import FORMAT, TeacherLogitCache, arrays_sha256, state_sha256

from .distributed import barrier, is_main, training_device
from .logger import log_msg

__all__ = ["attach_teacher_cache", "unsupported_reason", "cache_key", "fill_cache", "fill_from_cfg"]


def _info(msg: str) -> None:
    if is_main():
        print(log_msg(msg), flush=True)


def unsupported_reason(cfg, method, loader) -> Optional[str]:
    """Why a run of ``method`` on ``loader`` cannot use the cache; ``None`` when it can."""
    name = str(cfg.DISTILLER.TYPE)
    if name.upper() == "NONE":
        return "DISTILLER.TYPE NONE runs no teacher"
    if not getattr(method, "teacher_logits_only", False):
        return f"{name} reads the teacher's features, not only its logits"
    if isinstance(loader, DeviceLoader) and loader.augment is not None:
        return None
    if get_dataset_info(cfg.DATASET.TYPE).model_family == "cifar" and not cfg.DATASET.BATCH_AUG:
        return "DATASET.BATCH_AUG False: the per-image pipeline does not report each sample's view"
    return (f"the training augmentation of {cfg.DATASET.TYPE} is continuous (a random resized crop or rotation), "
            "so an image has no finite set of views")


def cache_key(cfg, teacher: torch.nn.Module, loader: DeviceLoader, num_classes: int) -> Dict:
    """What the cached logits depend on: the teacher's weights, the data, the transform and the precision."""
    return {
        "format": FORMAT,
        "teacher": {"name": str(cfg.DISTILLER.TEACHER), "classes": int(num_classes),
                    "sha256": state_sha256(teacher.state_dict())},
        "dataset": {"name": str(cfg.DATASET.TYPE), "size": int(loader.num_data),
                    "sha256": arrays_sha256(loader.images, loader.targets)},
        "transform": loader.augment.settings(int(loader.images.shape[1])),
        "precision": str(cfg.SOLVER.AMP) or "float32",
    }


def _open(cfg, teacher, loader, num_classes: int, shared: bool) -> TeacherLogitCache:
    key = cache_key(cfg, teacher, loader, num_classes)
    args = (str(cfg.SOLVER.TEACHER_CACHE), key, loader.num_data, key["transform"]["views"], num_classes)
    if not shared:
        return TeacherLogitCache.open(*args, log=_info)
    # Under torchrun the main process makes the file and the others open it once it exists.
    cache = TeacherLogitCache.open(*args, log=_info) if is_main() else None
    barrier()
    return cache if cache is not None else TeacherLogitCache.open(*args, create=False, log=_info)


def _fill_line(cache: TeacherLogitCache) -> str:
    n = int(cache.filled().sum())
    return f"{n} of {cache.rows} (sample, view) entries filled ({100.0 * n / cache.rows:.1f}%)"


def attach_teacher_cache(cfg, distiller, loader) -> Optional[TeacherLogitCache]:
    """Give ``distiller`` the cache of ``SOLVER.TEACHER_CACHE`` and make ``loader`` report views, if they can use it."""
    if not str(cfg.SOLVER.TEACHER_CACHE).strip():
        return None
    reason = unsupported_reason(cfg, type(distiller), loader)
    if reason is not None:
        _info(f"SOLVER.TEACHER_CACHE not used: {reason}; the run goes on without it")
        return None
    num_classes = get_dataset_info(cfg.DATASET.TYPE).num_classes
    cache = _open(cfg, distiller.teacher, loader, num_classes, shared=True)
    distiller.teacher_cache = cache
    loader.with_view = True
    _info(f"teacher cache {cache.path}: {_fill_line(cache)}")
    return cache


def fill_cache(cache: TeacherLogitCache, frozen: FrozenTeacher, loader: DeviceLoader, device: torch.device,
               batch_size: int = 1024, amp_dtype=None, channels_last: bool = False,
               progress: bool = True) -> Tuple[int, float]:
    """Compute and store every entry not yet filled; returns ``(entries filled now, seconds)``.

    Each entry's image is made exactly as a training batch makes it (the same
    crop, flip and normalization, then the trainer's dtype and layout).
    """
    from tqdm import tqdm

    todo = np.flatnonzero(~cache.filled())
    aug, images = loader.augment, loader.images
    in_size = int(images.shape[1])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    with tqdm(total=cache.rows, initial=cache.rows - len(todo), desc="teacher cache", unit="img",
              disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            rows = todo[start:start + batch_size]
            r = torch.from_numpy(rows)
            offsets, flips = aug.view_params(r % cache.views, in_size)
            raw = images.index_select(0, (r // cache.views).to(images.device))
            image = aug(raw, offsets, flips).to(device).float().contiguous(memory_format=fmt)
            with amp:
                logits, _ = frozen.run(image)
            cache.store_rows(rows, logits)
            bar.update(len(rows))
    return len(todo), time.perf_counter() - t0


def fill_from_cfg(cfg, batch_size: int = 1024, progress: bool = True) -> Dict:
    """Open (or make) the cache of ``cfg`` and fill it; returns the figures the command line prints."""
    from .trainers.base import AMP_DTYPES

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} is not a batch size; give 1 or more")
    if not str(cfg.SOLVER.TEACHER_CACHE).strip():
        raise ConfigError("SOLVER.TEACHER_CACHE is empty; give the cache folder, "
                          "e.g. SOLVER.TEACHER_CACHE ./teacher_cache")
    amp = str(cfg.SOLVER.AMP)
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown SOLVER.AMP {amp!r}. Valid choices: '' (off), bf16, fp16")
    info = get_dataset_info(cfg.DATASET.TYPE)
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    loader = info.build(cfg, False)[0]
    reason = unsupported_reason(cfg, method, loader)
    if reason is not None:
        raise ConfigError(f"nothing to cache for this config: {reason}")
    teacher = load_teacher(cfg, info.num_classes)
    cache = _open(cfg, teacher, loader, info.num_classes, shared=False)
    device = training_device()
    frozen = FrozenTeacher(teacher.to(device), fold_bn=True, channels_last=bool(cfg.SOLVER.CHANNELS_LAST))
    _info(f"teacher cache {cache.path}: {_fill_line(cache)}")
    n, seconds = fill_cache(cache, frozen, loader, device, batch_size, AMP_DTYPES[amp],
                            bool(cfg.SOLVER.CHANNELS_LAST), progress)
    out = {"path": cache.path, "filled_now": n, "seconds": seconds, "size": cache.size,
           "filled": int(cache.filled().sum()), "rows": cache.rows}
    cache.close()
    return out
