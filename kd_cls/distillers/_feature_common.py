"""Helpers shared by the feature distillers: tap selection and shape probing."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

from kd_cls.hooks import run_and_capture
from kd_cls.models import get_taps

_TAP_KINDS = ("feats", "preact_feats", "pooled_feat")


def model_taps(model: nn.Module, kind: str, method: str) -> Union[List[str], str]:
    """The tap(s) ``model`` declares under ``kind`` (``feats``, ``preact_feats`` or ``pooled_feat``)."""
    if kind not in _TAP_KINDS:
        raise ValueError(f"unknown tap kind {kind!r}; valid: {', '.join(_TAP_KINDS)}")
    taps = get_taps(model)
    if kind not in taps or not taps[kind]:
        raise ValueError(
            f"{method} needs {kind!r} taps, but {type(model).__name__}.tap_points() declares none "
            f"(it declares {', '.join(k for k in taps if taps[k]) or 'nothing'})"
        )
    return taps[kind]


def pick_tap(taps: Sequence[str], index: int, what: str) -> str:
    """``taps[index]`` with a one-line error naming the valid range."""
    if not -len(taps) <= index < len(taps):
        raise ValueError(f"{what} {index} is out of range; valid: 0..{len(taps) - 1} ({len(taps)} stages)")
    return taps[index]


@torch.no_grad()
def probe_shapes(model: nn.Module, taps: Sequence[str], input_size: Sequence[int]) -> List[torch.Size]:
    """Shapes of the features at ``taps`` for one ``(1, 3, *input_size)`` random image.

    The model runs in eval mode, so its BN statistics are left untouched, and
    returns to its previous mode.
    """
    was_training = [m.training for m in model.modules()]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.randn(1, 3, *[int(s) for s in input_size], device=device, dtype=dtype)
    model.eval()
    try:
        _, feats = run_and_capture(model, list(taps), x, detach=True)
    finally:
        for m, mode in zip(model.modules(), was_training):
            m.training = mode
    return [f.shape for f in feats]


def feature_pair_shapes(
    student: nn.Module, teacher: nn.Module, s_taps: Sequence[str], t_taps: Sequence[str], input_size
) -> Tuple[List[torch.Size], List[torch.Size]]:
    """``(student shapes, teacher shapes)`` at the given taps (see :func:`probe_shapes`)."""
    return probe_shapes(student, s_taps, input_size), probe_shapes(teacher, t_taps, input_size)
