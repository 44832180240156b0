"""Helpers shared by the feature distillers: tap selection, shape probing, FitNet's regressor."""
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


class ConvReg(nn.Module):
    """FitNet's regressor: student map ``(N, Cs, Hs, Ws)`` -> teacher shape ``(N, Ct, Ht, Wt)``.

    Conv 3x3 stride 2 when ``Hs == 2 Ht``; transposed conv 4x4 stride 2 when
    ``2 Hs == Ht``; otherwise a conv of kernel ``(1 + Hs - Ht, 1 + Ws - Wt)``
    (needs ``Hs >= Ht``). Then BN and, with ``use_relu``, ReLU.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"no regressor from student map {s_h}x{s_w} to teacher map {t_h}x{t_w}; "
                "the student map must be at least the teacher's size, or half of it"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


def feature_pair_shapes(
    student: nn.Module, teacher: nn.Module, s_taps: Sequence[str], t_taps: Sequence[str], input_size
) -> Tuple[List[torch.Size], List[torch.Size]]:
    """``(student shapes, teacher shapes)`` at the given taps (see :func:`probe_shapes`)."""
    return probe_shapes(student, s_taps, input_size), probe_shapes(teacher, t_taps, input_size)
