"""CWD: channel-wise distillation for dense prediction.

Paper: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction",
ICCV 2021, arXiv 2011.13256.

Reference implementation matched here: ``ChannelWiseDivergence`` with
``loss_weight=1.0`` from open-mmlab/mmrazor, commit
90c7af1fdf35a606a2fceaaeb4b6be2f0dac4eb7, file ``mmrazor/models/losses/cwd.py``.

Every channel of every sample is turned into a distribution over its ``H * W``
positions by a softmax at temperature ``tau``; the loss is the KL divergence
from the teacher's distribution to the student's, summed over positions,
averaged over the ``N * C`` (sample, channel) pairs and multiplied by
``tau ** 2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cwd_loss"]


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise KL divergence ``KL(p_t || p_s)``; a scalar tensor.

    Args:
        student: ``(N, C, H, W)`` student map (features or dense logits).
        teacher: ``(N, C, H, W)`` teacher map of the same shape.
        tau: softmax temperature.

    Returns:
        ``tau**2 / (N * C) * sum_{n,c} sum_{hw} p_t * (log p_t - log p_s)`` with
        ``p = softmax(x[n, c].flatten() / tau)``.
    """
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"cwd_loss: expects two (N, C, H, W) maps of one shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    n, c = student.shape[:2]
    s_logits = student.reshape(n * c, -1) / tau
    t_logits = teacher.reshape(n * c, -1) / tau
    p_t = F.softmax(t_logits, dim=1)
    kl = (p_t * (F.log_softmax(t_logits, dim=1) - F.log_softmax(s_logits, dim=1))).sum()
    return kl * (tau**2) / (n * c)
