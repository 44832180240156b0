"""Logit distillation losses: Hinton KD and Decoupled KD.

Shapes: logits are ``(N, C)`` float tensors, ``target`` is ``(N,)`` int64 class
indices. Every loss returns a scalar tensor (mean over the batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "dkd_loss", "dkd_loss_parts"]

# Subtracted from the target logit so that its probability underflows to 0 in
# float32 (exp(-1000) == 0): the softmax then runs over the non-target classes.
_MASK_OFFSET = 1000.0


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015 (arXiv 1503.02531).

    ``T^2 * mean_n sum_c p_t(c) * (log p_t(c) - log p_s(c))`` with ``p = softmax(z / T)``.
    """
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * temperature**2


def _binary_probs(probs: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` probabilities -> ``(N, 2)``: [p(target), p(all other classes)]."""
    p_gt = (probs * gt_mask).sum(1, keepdim=True)
    p_other = (probs * ~gt_mask).sum(1, keepdim=True)
    return torch.cat([p_gt, p_other], dim=1)


def dkd_loss_parts(logits_student, logits_teacher, target, temperature: float):
    """Return ``(tckd, nckd)`` of Decoupled KD (Zhao et al., CVPR 2022, arXiv 2203.08679).

    TCKD: KL between the binary (target vs. non-target) distributions.
    NCKD: KL between the distributions over the non-target classes alone.
    Both are summed over classes, averaged over the batch and scaled by ``T^2``.
    """
    n = target.shape[0]
    gt_mask = torch.zeros_like(logits_student, dtype=torch.bool)
    gt_mask.scatter_(1, target.reshape(-1, 1).long(), True)

    b_s = _binary_probs(F.softmax(logits_student / temperature, dim=1), gt_mask)
    b_t = _binary_probs(F.softmax(logits_teacher / temperature, dim=1), gt_mask)
    # clamp: when both models saturate (p == 0 for the same entry) log(0) would make 0 * inf = NaN.
    tckd = F.kl_div(torch.log(b_s.clamp_min(torch.finfo(b_s.dtype).tiny)), b_t, reduction="sum") * temperature**2 / n

    offset = _MASK_OFFSET * gt_mask
    log_q_s = F.log_softmax(logits_student / temperature - offset, dim=1)
    q_t = F.softmax(logits_teacher / temperature - offset, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature**2 / n
    return tckd, nckd


def dkd_loss(logits_student, logits_teacher, target, alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (see :func:`dkd_loss_parts`)."""
    tckd, nckd = dkd_loss_parts(logits_student, logits_teacher, target, temperature)
    return alpha * tckd + beta * nckd
