"""Quality-focal distillation of sigmoid classification scores (CrossKD).

Paper: Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Dense
Object Detection", arXiv 2306.11369 (CVPR 2024). The loss is the quality
focal loss of Li et al., "Generalized Focal Loss", NeurIPS 2020, with the
teacher's sigmoid scores as soft targets.

Reference implementation matched here: ``kd_quality_focal_loss`` (the function
behind ``KDQualityFocalLoss``) from jbwang1997/CrossKD, commit
87e156a46259e3a516b65fc6a049b200b9ab0d54, file ``mmdet/models/losses/kd_loss.py``,
with ``reduction='mean'`` and the reduction of ``weight_reduce_loss`` in
``mmdet/models/losses/utils.py`` of the same commit.

Nothing is summed over the classes before weighting: the per-(anchor, class)
terms are weighted by the anchor's weight and then either averaged over all
``M * K`` entries (no ``avg_factor``) or summed and divided by
``avg_factor + eps`` with ``eps`` the float32 machine epsilon.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["kd_quality_focal_loss"]

_F32_EPS = torch.finfo(torch.float32).eps


def kd_quality_focal_loss(
    pred: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    beta: float = 1.0,
    avg_factor: Optional[float] = None,
) -> torch.Tensor:
    """Quality focal loss of student logits against the teacher's sigmoid; a scalar.

    Args:
        pred: ``(M, K)`` student logits (``M`` anchors or points, ``K`` classes).
        teacher_logits: ``(M, K)`` teacher logits; detached here, targets are
            their sigmoids.
        weight: optional ``(M,)`` weight of each anchor, shared by its ``K``
            entries (the official code only accepts this shape).
        beta: exponent of the modulating factor ``|sigmoid(pred) - target|``.
        avg_factor: if given, the weighted sum is divided by
            ``avg_factor + eps``; otherwise the weighted entries are averaged
            over all ``M * K`` of them.

    Returns:
        The reduced loss; each entry is
        ``BCE_with_logits(pred, t) * |sigmoid(pred) - t| ** beta * weight[m]``
        with ``t = sigmoid(teacher_logits)``.
    """
    if pred.dim() != 2 or pred.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_quality_focal_loss: expects two (M, K) logit tensors of one shape, got "
            f"{tuple(pred.shape)} and {tuple(teacher_logits.shape)}"
        )
    soft_target = teacher_logits.detach().sigmoid()
    entry = F.binary_cross_entropy_with_logits(pred, soft_target, reduction="none")
    entry = entry * (pred.sigmoid() - soft_target).abs().pow(beta)
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != pred.shape[0]:
            raise ValueError(
                f"kd_quality_focal_loss: weight must have shape ({pred.shape[0]},), got {tuple(weight.shape)}"
            )
        entry = entry * weight.unsqueeze(1)
    if avg_factor is None:
        return entry.mean()
    return entry.sum() / (avg_factor + _F32_EPS)
