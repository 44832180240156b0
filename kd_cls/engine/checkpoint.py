"""Checkpoint files in mdistiller's layout, and teacher/pretrained weight resolution.

Files (names and dicts as mdistiller's trainer writes them):

* full state ``latest``, ``best``, ``epoch_N``: ``{"epoch", "model", "optimizer",
  "best_acc"}``, where ``model`` is the distiller's state dict with
  DataParallel's ``module.`` prefix, so mdistiller's ``--resume`` reads ours;
  either form loads here;
* student only ``student_latest``, ``student_best``, ``student_N``:
  ``{"model": student.state_dict()}`` (what ``tools/eval.py -c`` takes).

Writes are atomic (a temporary file in the same directory, then
``os.replace``), so a killed run never leaves a truncated checkpoint.

Every ``torch.load`` here uses ``weights_only=True``. Checkpoints that store
numpy scalars (older releases record accuracies that way) are read by
allowing numpy's scalar and dtype reconstructors only, still under
``weights_only``. A file that needs any other Python object is refused with a
message, never unpickled.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from kd_cls.registry import Registry

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "strip_prefix",
    "add_prefix",
    "model_state_from_checkpoint",
    "load_model_state",
    "load_weights_file",
    "teacher_weights_path",
    "load_teacher",
    "load_pretrained",
    "register_pretrained_loader",
    "register_weights_hint",
]

DP_PREFIX = "module."
MDISTILLER_RELEASE = "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (one-line message)."""


# ----------------------------------------------------------------------------- I/O
def save_checkpoint(obj, path: str) -> None:
    """``torch.save(obj, path)`` atomically: readers see the old file or the new one, never a partial one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _numpy_safe_globals():
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [scalar, np.dtype, *dtypes]


def load_checkpoint(path: str, map_location="cpu", hint: str = ""):
    """Load a checkpoint with ``weights_only=True`` (see module docstring).

    A missing file raises ``FileNotFoundError`` naming it (and ``hint``: how to get it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}" + (f"; {hint}" if hint else ""))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
            raise CheckpointError(
                f"{path} holds Python objects that weights_only loading refuses ({reason}); "
                "re-save it as a dict of tensors, e.g. {'model': model.state_dict()}"
            ) from None
    except (RuntimeError, EOFError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({msg})") from None


# ----------------------------------------------------------------------------- state dicts
def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = DP_PREFIX) -> Dict[str, torch.Tensor]:
    """Drop ``prefix`` when every key has it (DataParallel/DDP checkpoints); otherwise return a copy."""
    keys = list(state)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def add_prefix(state: Mapping[str, torch.Tensor], prefix: str = DP_PREFIX) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def model_state_from_checkpoint(ckpt) -> Dict[str, torch.Tensor]:
    """The model weights in a checkpoint: mdistiller's ``{"model": ...}``, a bare state dict,
    or a full distiller state, from which the ``student.`` part is taken."""
    state = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a state dict, found {type(state).__name__}")
    state = strip_prefix(state)
    if any(k.startswith("student.") for k in state) and any(k.startswith("teacher.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return state


def _classifier_key(model: nn.Module) -> Optional[str]:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return f"{last}.weight" if last is not None else None


def _few(keys, n: int = 4) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str = "model") -> None:
    """``model.load_state_dict(state, strict=True)`` with one-line errors.

    Names the missing and unexpected keys, and says so plainly when the
    classifier's class count differs from the model's.
    """
    own = model.state_dict()
    cls_key = _classifier_key(model)
    if cls_key and cls_key in state and cls_key in own and state[cls_key].shape[0] != own[cls_key].shape[0]:
        raise CheckpointError(
            f"{source} has {state[cls_key].shape[0]} classes but the {what} needs {own[cls_key].shape[0]} "
            f"({cls_key} {tuple(state[cls_key].shape)} vs {tuple(own[cls_key].shape)}): it was trained on another dataset"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise CheckpointError(f"{source} does not fit the {what} {type(model).__name__}: {'; '.join(parts)}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source} does not fit the {what} {type(model).__name__}: {k} has shape {tuple(state[k].shape)} "
            f"in the checkpoint, {tuple(own[k].shape)} in the model ({len(bad)} mismatched tensors)"
        )
    model.load_state_dict(state, strict=True)


def load_weights_file(model: nn.Module, path: str, what: str = "model", hint: str = "") -> nn.Module:
    """Load the weights stored at ``path`` (any layout of :func:`model_state_from_checkpoint`) into ``model``."""
    ckpt = load_checkpoint(path, hint=hint)
    try:
        state = model_state_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    load_model_state(model, state, path, what)
    return model


# ----------------------------------------------------------------------------- teachers
# How to get the default weights of a model family, for the missing-file message.
_WEIGHTS_HINTS: Dict[str, str] = {
    "cifar": (
        f"download cifar_teachers.tar from {MDISTILLER_RELEASE} and extract it into ./download_ckpts "
        "(tar xvf cifar_teachers.tar -C download_ckpts)"
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


def _family(dataset: str) -> str:
    from kd_cls.data.registry import get_dataset_info

    return get_dataset_info(dataset).model_family


def teacher_weights_path(name: str, dataset: str, override: str = "") -> str:
    """``override`` if given, else the model's default (mdistiller's) checkpoint path."""
    if override:
        return override
    from kd_cls.models import default_weights

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
    from kd_cls.models import build_model

    if not path and dataset in PRETRAINED_LOADERS:
        return PRETRAINED_LOADERS.get(dataset)(name, dataset, num_classes)
    model = build_model(name, num_classes=num_classes, dataset=dataset)
    ckpt = teacher_weights_path(name, dataset, path)
    if path:
        hint = path_hint
    else:
        hint = _WEIGHTS_HINTS.get(_family(dataset), "")
        hint = (hint + ", or " if hint else "") + "set DISTILLER.TEACHER_WEIGHTS to a checkpoint"
    return load_weights_file(model, ckpt, what=f"{what} {name}", hint=hint)


def load_teacher(cfg, num_classes: int) -> nn.Module:
    """The teacher ``cfg.DISTILLER.TEACHER`` with weights from ``DISTILLER.TEACHER_WEIGHTS`` or its default path."""
    return load_pretrained(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE, num_classes, cfg.DISTILLER.TEACHER_WEIGHTS)
