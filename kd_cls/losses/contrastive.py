"""The NCE loss of Contrastive Representation Distillation (Tian et al., ICLR 2020, arXiv 1910.10699)."""
from __future__ import annotations

import torch

__all__ = ["crd_nce_loss"]

_EPS = 1e-7


def crd_nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """Noise-contrastive estimation loss over one positive and ``K`` negatives.

    Args:
        scores: ``(N, K + 1)`` (or ``(N, K + 1, 1)``) positive unnormalised
            probabilities ``exp(<v, m> / T) / Z``; column 0 is the positive pair,
            columns 1..K the negatives drawn from the memory bank.
        num_data: size of the memory bank; the noise distribution is uniform,
            ``P_n = 1 / num_data``.

    With ``c = K * P_n`` the loss is
    ``-(1/N) * sum_i [log(s_i0 / (s_i0 + c)) + sum_k log(c / (s_ik + c))]``,
    i.e. the binary cross-entropy of "drawn from the data" vs "drawn from noise".
    Returns a scalar tensor.
    """
    if scores.dim() == 3:
        scores = scores.squeeze(-1)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"crd_nce_loss: scores must be (N, K+1) with K >= 1, got {tuple(scores.shape)}")
    n, k = scores.shape[0], scores.shape[1] - 1
    c = k / float(num_data)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + c + _EPS))
    log_d0 = torch.log(c / (neg + c + _EPS))
    return -(log_d1.sum() + log_d0.sum()) / n
