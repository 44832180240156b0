"""The detection method registry and what a method reads in one step (``KDInputs``)."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from kd_cls.registry import Registry

KD_METHODS = Registry("KD method")


def register_kd_method(name: str):
    return KD_METHODS.register(name)


@dataclass
class KDInputs:
    """What a detection KD method may read in one training step.

    student_features / teacher_features: FPN outputs ``{"p2": (N, C, H, W), ...}``.
    student_logits / teacher_logits: RoI class logits ``(R, K + 1)`` on the
    student's sampled proposals (R over the batch); ``gt_classes`` ``(R,)``
    int64 in ``[0, K]`` (K is background). None unless a method needs them.
    """

    student_features: Dict[str, torch.Tensor]
    teacher_features: Dict[str, torch.Tensor]
    student_logits: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    gt_classes: Optional[torch.Tensor] = None
