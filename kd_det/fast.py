"""The detection teacher's inference copy: norms folded into detectron2's convolutions.

detectron2's ``Conv2d`` applies its ``norm`` (and activation) inside its own
``forward``, so the graph search of :func:`kd_cls.nn.bn_fold.fold_batchnorm`
cannot see the pair. Here every ``Conv2d`` whose ``norm`` is a
``FrozenBatchNorm2d`` (or a BatchNorm with running statistics) has it folded in
with the same arithmetic (:func:`kd_cls.nn.bn_fold.fold_into`), then ``norm``
is set to ``None``. The activation stays where it was, after the affine map, so
the output is the same within float rounding.

:func:`fold_detectron2_norms` is the folder the detection teacher's
:class:`kd_cls.nn.teacher.FrozenTeacher` uses for its inference copies.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_cls.nn.bn_fold import fold_into
from detectron2.layers import Conv2d, FrozenBatchNorm2d

__all__ = ["fold_conv_norms", "fold_detectron2_norms"]

logger = logging.getLogger(__name__)


def _foldable_norm(norm: Optional[nn.Module]) -> bool:
    if type(norm) is FrozenBatchNorm2d:
        return True
    return isinstance(norm, _BatchNorm) and norm.track_running_stats and norm.running_mean is not None


def fold_conv_norms(module: nn.Module, channels_last: bool = False) -> nn.Module:
    """An eval-mode copy of ``module`` with each foldable ``Conv2d.norm`` folded into its convolution.

    ``module`` is never modified. Only exact ``detectron2.layers.Conv2d``
    instances are touched (a subclass may change ``forward``); GroupNorm and
    other norms without fixed statistics stay. ``copy.folded_norms`` counts the
    folds. ``channels_last`` stores 4-d weights in NHWC, so the convolutions run
    in that format whatever the input's layout.
    """
    folded = copy.deepcopy(module).eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    n = 0
    for m in folded.modules():
        if type(m) is Conv2d and _foldable_norm(m.norm):
            fold_into(m, m.norm)
            m.norm = None
            n += 1
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    folded.folded_norms = n
    return folded


def fold_detectron2_norms(module: nn.Module, keep_taps: Sequence[str] = (), example_input=None,
                          channels_last: bool = False) -> nn.Module:
    """:func:`fold_conv_norms` as a :data:`kd_cls.nn.teacher.Folder` (taps never conflict: a folded
    ``Conv2d`` still outputs the normalised value)."""
    return fold_conv_norms(module, channels_last=channels_last)
