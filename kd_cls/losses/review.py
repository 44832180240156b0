"""ReviewKD's hierarchical context loss (Chen et al., CVPR 2021, arXiv 2104.09044)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["hcl_loss"]

# Pyramid levels pooled on top of the full-resolution MSE, with halving weights.
_HCL_LEVELS = (4, 2, 1)


def hcl_loss(features_student: Sequence[torch.Tensor], features_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over feature pairs of a weighted mean of MSEs at several pooled sizes.

    Each pair is ``(N, C, H, W)`` of equal shape. For a pair, the MSE at full
    resolution has weight 1; then for each ``l`` in 4, 2, 1 with ``l < H`` the
    MSE of the ``l x l`` adaptive-average-pooled maps gets weight 1/2, 1/4, ...
    The pair's loss is the weighted sum divided by the sum of weights.
    """
    if len(features_student) != len(features_teacher):
        raise ValueError(
            f"hcl_loss: {len(features_student)} student features vs {len(features_teacher)} teacher features"
        )
    total = 0.0
    for fs, ft in zip(features_student, features_teacher):
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss: student feature {tuple(fs.shape)} != teacher feature {tuple(ft.shape)}")
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, weight_sum = 1.0, 1.0
        for level in _HCL_LEVELS:
            if level >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weight_sum += weight
        total = total + loss / weight_sum
    return total
