"""The detection teacher's inference copy: norms folded into detectron2's convolutions.

detectron2's ``Conv2d`` applies its ``norm`` (and activation) inside its own
``forward``, so the graph search of :func:`kd_cls.engine.fast.fold_batchnorm`
cannot see the pair. Here every ``Conv2d`` whose ``norm`` is a
``FrozenBatchNorm2d`` (or a BatchNorm with running statistics) has it folded in
with the same arithmetic (:func:`kd_cls.engine.fast.fold_into`), then ``norm``
is set to ``None``. The activation stays where it was, after the affine map, so
the output is the same within float rounding.

:class:`TeacherCopy` keeps such a copy of the parts of a teacher that run in
training (backbone and RoI heads). It rebuilds the copy whenever a teacher
tensor changed since the last build (a checkpoint load, a device move), so the
registered teacher stays the single source of truth.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_cls.engine.fast import fold_into, state_fingerprint
from kd_det.compat import ensure_detectron2_ops

ensure_detectron2_ops()

from detectron2.layers import Conv2d, FrozenBatchNorm2d  # noqa: E402

__all__ = ["fold_conv_norms", "TeacherCopy"]

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


class TeacherCopy:
    """Lazily built inference copies of ``teacher.<part>`` for each part in ``parts``.

    ``get(part)`` returns the folded copy (or the teacher's own module when
    neither folding nor ``channels_last`` is on). A copy is rebuilt when any
    teacher parameter or buffer was modified in place, replaced, or moved since
    it was built (:func:`kd_cls.engine.fast.state_fingerprint`).
    """

    def __init__(self, teacher: nn.Module, parts: Sequence[str], fold: bool = True, channels_last: bool = False):
        self.teacher = teacher
        self.parts = tuple(parts)
        self.enabled = bool(fold or channels_last)
        self.fold = bool(fold)
        self.channels_last = bool(channels_last)
        self._copies: Dict[str, nn.Module] = {}
        self._key: Optional[Tuple] = None

    def _build(self, part: str) -> nn.Module:
        module = getattr(self.teacher, part)
        if self.fold:
            return fold_conv_norms(module, channels_last=self.channels_last)
        out = copy.deepcopy(module).eval()
        return out.to(memory_format=torch.channels_last)

    def get(self, part: str) -> nn.Module:
        if not self.enabled:
            return getattr(self.teacher, part)
        key = state_fingerprint(self.teacher)
        if key != self._key:
            self._copies = {p: self._build(p) for p in self.parts}
            self._key = key
            folded = sum(getattr(c, "folded_norms", 0) for c in self._copies.values())
            logger.debug("teacher inference copy built: %d norms folded", folded)
        return self._copies[part]
