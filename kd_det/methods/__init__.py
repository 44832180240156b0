"""Detection KD methods. One file per method; each registers itself with ``@register_kd_method``.

A method is an ``nn.Module`` built by ``Method.from_models(cfg, student, teacher)``.
It declares what it needs (``NEEDS_ROI_LOGITS``) and returns its losses from
``forward(inputs: KDInputs) -> {"loss_<name>": scalar}``. ``ATTR`` is the
attribute name under which ``RCNNKD`` holds it, which fixes its parameter names
in checkpoints (mdistiller's ReviewKD lives at ``kd_trans``).
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from kd_cls.registry import Registry, import_submodules

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


import_submodules(__name__, __path__)
