"""Where a zoo model's pretrained (teacher) weights come from, and how to load them.

Kept with the models, as timm keeps ``_pretrained.py``:

* mdistiller's default checkpoint path of each teacher (``register_model(weights=...)``),
  and per model family a hint on how to get those files when one is missing;
* per-dataset loaders for teachers that are not plain files: ImageNet's are
  torchvision's ``IMAGENET1K_V1`` weights, read from torch hub's cache and
  never downloaded;
* :func:`load_teacher`: ``DISTILLER.TEACHER`` with ``DISTILLER.TEACHER_WEIGHTS``
  or its default.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List

from torch import nn

from kd_cls.checkpoint_io import CheckpointError, load_weights_file
from kd_cls.data.registry import get_dataset_info
from kd_cls.registry import Registry

from .registry import build_model, default_weights

__all__ = [
    "MDISTILLER_RELEASE",
    "PRETRAINED_LOADERS",
    "register_pretrained_loader",
    "register_weights_hint",
    "teacher_weights_path",
    "load_pretrained",
    "load_teacher",
    "load_imagenet_teacher",
    "imagenet_teacher_candidates",
    "torchvision_weights_url",
]

MDISTILLER_RELEASE = "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints"

# How to get the default weights of a model family, for the missing-file message.
_WEIGHTS_HINTS: Dict[str, str] = {
    "cifar": (
        f"download cifar_teachers.tar from {MDISTILLER_RELEASE} and extract it into ./download_ckpts "
        "(tar xvf cifar_teachers.tar -C download_ckpts)"
    ),
    "tiny_imagenet": (
        f"get the Tiny-ImageNet teachers of {MDISTILLER_RELEASE} and put them in "
        "./download_ckpts/tiny_imagenet_teachers (ResNet18_vanilla/ti_res18)"
    ),
}


def register_weights_hint(family: str, text: str) -> None:
    """Say how to obtain the default checkpoints of a model family (shown when one is missing)."""
    _WEIGHTS_HINTS[family] = text


# Per-dataset loaders of pretrained models: fn(model_name, dataset, num_classes) -> nn.Module.
# Datasets whose teachers are not plain files (torchvision's ImageNet weights) register one.
PRETRAINED_LOADERS = Registry("pretrained-weights loader")


def register_pretrained_loader(dataset: str) -> Callable:
    def deco(fn):
        PRETRAINED_LOADERS.register(dataset, fn)
        return fn

    return deco


def teacher_weights_path(name: str, dataset: str, override: str = "") -> str:
    """``override`` if given, else the model's default (mdistiller's) checkpoint path."""
    if override:
        return override
    path = default_weights(name, dataset)
    if not path:
        raise CheckpointError(
            f"no default checkpoint for teacher {name!r} on {dataset!r}; "
            "set DISTILLER.TEACHER_WEIGHTS (tools/eval.py: -c) to a checkpoint file"
        )
    return path


def load_pretrained(name: str, dataset: str, num_classes: int, path: str = "", what: str = "teacher",
                    path_hint: str = "check DISTILLER.TEACHER_WEIGHTS") -> nn.Module:
    """Build zoo model ``name`` for ``dataset`` and load its weights (``path`` or the default).

    ``path_hint`` ends the message when a given ``path`` is missing.
    """
    if not path and dataset in PRETRAINED_LOADERS:
        return PRETRAINED_LOADERS.get(dataset)(name, dataset, num_classes)
    model = build_model(name, num_classes=num_classes, dataset=dataset)
    ckpt = teacher_weights_path(name, dataset, path)
    if path:
        hint = path_hint
    else:
        hint = _WEIGHTS_HINTS.get(get_dataset_info(dataset).model_family, "")
        hint = (hint + ", or " if hint else "") + "set DISTILLER.TEACHER_WEIGHTS to a checkpoint"
    return load_weights_file(model, ckpt, what=f"{what} {name}", hint=hint)


def load_teacher(cfg, num_classes: int) -> nn.Module:
    """The teacher ``cfg.DISTILLER.TEACHER`` with weights from ``DISTILLER.TEACHER_WEIGHTS`` or its default path."""
    return load_pretrained(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE, num_classes, cfg.DISTILLER.TEACHER_WEIGHTS)


# ----------------------------------------------------------------------------- ImageNet
# ImageNet teachers are torchvision's original ("IMAGENET1K_V1") weights, the
# ones mdistiller loads; its older file name for the same weights is accepted too.
_TORCHVISION_WEIGHTS = {"ResNet18": "ResNet18_Weights", "ResNet34": "ResNet34_Weights",
                        "ResNet50": "ResNet50_Weights", "ResNet101": "ResNet101_Weights"}
_LEGACY_FILES = {"ResNet18": "resnet18-5c106cde.pth", "ResNet34": "resnet34-333f7ec4.pth",
                 "ResNet50": "resnet50-19c8e357.pth", "ResNet101": "resnet101-5d3b4d8f.pth"}


def torchvision_weights_url(name: str) -> str:
    """The download URL of torchvision's IMAGENET1K_V1 weights of zoo model ``name``."""
    import torchvision.models as tvm

    if name not in _TORCHVISION_WEIGHTS:
        raise FileNotFoundError(
            f"torchvision has no ImageNet weights for {name!r} (it has {', '.join(sorted(_TORCHVISION_WEIGHTS))}); "
            "set DISTILLER.TEACHER_WEIGHTS to a checkpoint of it"
        )
    return getattr(tvm, _TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1.url


def imagenet_teacher_candidates(name: str) -> List[str]:
    """Paths looked at, in order: torch hub's checkpoint cache under torchvision's file names."""
    import torch

    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    names = [os.path.basename(torchvision_weights_url(name)), _LEGACY_FILES.get(name)]
    return [os.path.join(cache, n) for n in names if n]


@register_pretrained_loader("imagenet")
def load_imagenet_teacher(name: str, dataset: str, num_classes: int) -> nn.Module:
    """Zoo model ``name`` with torchvision's ImageNet weights from the local torch hub cache (never downloaded)."""
    paths = imagenet_teacher_candidates(name)
    found = next((p for p in paths if os.path.isfile(p)), None)
    if found is None:
        url = torchvision_weights_url(name)
        raise FileNotFoundError(
            f"ImageNet teacher {name}: {paths[0]} not found; download {url} into {os.path.dirname(paths[0])} "
            "(nothing is downloaded here), or set DISTILLER.TEACHER_WEIGHTS to a torchvision-format .pth"
        )
    model = build_model(name, num_classes=num_classes, dataset=dataset)
    return load_weights_file(model, found, what=f"teacher {name}")
