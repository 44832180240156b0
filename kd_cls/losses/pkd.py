"""PKD: feature imitation through the Pearson correlation coefficient.

Paper: Cao et al., "PKD: General Distillation Framework for Object Detectors
via Pearson Correlation Coefficient", NeurIPS 2022, arXiv 2207.02039.

Reference implementation matched here: ``PKDLoss`` with ``loss_weight=1.0``
from open-mmlab/mmrazor, commit 90c7af1fdf35a606a2fceaaeb4b6be2f0dac4eb7,
file ``mmrazor/models/losses/pkd_loss.py``, for one FPN level (the official
class sums this value over the levels it is given, then scales it by
``loss_weight``).

Each map is standardised channel by channel, the statistics of a channel being
taken over all its ``N * H * W`` values (batch and positions together; the
standard deviation is the unbiased one, with ``1e-6`` added to it). Half the
mean squared difference of the two standardised maps is the loss. With
``M = N * H * W`` and ``r_c`` the Pearson coefficient of channel ``c`` of the two
maps, it equals ``(M - 1) / M * mean_c(1 - r_c)`` (up to the epsilon), hence
the name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pkd_loss"]

_STD_EPS = 1e-6


def _standardise(feat: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (unbiased) deviation per channel over batch and space.

    ``(N, C, H, W)`` -> ``(N, C, H, W)``.
    """
    mean = feat.mean(dim=(0, 2, 3), keepdim=True)
    std = feat.std(dim=(0, 2, 3), keepdim=True)
    return (feat - mean) / (std + _STD_EPS)


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor, resize_stu: bool = True) -> torch.Tensor:
    """PKD loss of one feature level; a scalar tensor.

    Args:
        student: ``(N, C, H_s, W_s)`` student feature map.
        teacher: ``(N, C, H_t, W_t)`` teacher feature map (same ``N`` and ``C``).
        resize_stu: when the spatial sizes differ, bilinearly resize
            (``align_corners=False``) the student to the teacher's size if
            True (the official default), else the teacher to the student's.
            The official code only compares heights before resizing and fails
            when the heights agree but the widths do not; here any spatial
            difference triggers the resize, which gives the same value
            wherever the official code runs.

    Returns:
        ``mean((z_s - z_t) ** 2) / 2`` with ``z`` the per-channel standardised
        maps (see the module docstring).
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"pkd_loss: expects (N, C, H, W) maps, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[-2:] != teacher.shape[-2:]:
        if resize_stu:
            student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        else:
            teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
    if student.shape != teacher.shape:
        raise ValueError(
            f"pkd_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in batch or channels"
        )
    return 0.5 * F.mse_loss(_standardise(student), _standardise(teacher))
