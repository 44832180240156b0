"""Feature-map distillation losses: FitNet hints, AT, NST, OFD and VID.

Feature maps are ``(N, C, H, W)`` float tensors; the student's and the
teacher's may differ in channels and, where said, in spatial size. Every loss
returns a scalar tensor. Teacher features are expected without gradient.
The learnable parts of these methods (FitNet's regressor, OFD's connectors,
VID's regressors and variances) live in their distillers, not here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "match_spatial",
    "hint_loss",
    "attention_map",
    "at_loss",
    "nst_loss",
    "ofd_margins",
    "ofd_loss",
    "vid_loss",
]


def _check_pairs(name: str, g_s: Sequence, g_t: Sequence) -> None:
    if len(g_s) == 0 or len(g_t) == 0:
        raise ValueError(f"{name}: needs at least one feature pair; got {len(g_s)} student and {len(g_t)} teacher")


def match_spatial(f_s: torch.Tensor, f_t: torch.Tensor):
    """Average-pool the taller of two maps down to the other's height.

    The output is square (``(h, h)`` with ``h`` the smaller height), as in the
    reference implementations, whose inputs are all square.
    """
    h_s, h_t = f_s.shape[2], f_t.shape[2]
    if h_s > h_t:
        f_s = F.adaptive_avg_pool2d(f_s, (h_t, h_t))
    elif h_s < h_t:
        f_t = F.adaptive_avg_pool2d(f_t, (h_s, h_s))
    return f_s, f_t


def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al., arXiv 1412.6550): mean squared error of the
    regressed student hint and the teacher's hint layer, both ``(N, C, H, W)``."""
    if f_s.shape != f_t.shape:
        raise ValueError(
            f"hint_loss: regressed student feature {tuple(f_s.shape)} != teacher feature {tuple(f_t.shape)}"
        )
    return F.mse_loss(f_s, f_t)


def attention_map(feat: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Spatial attention of Zagoruyko & Komodakis: ``(N, C, H, W)`` -> ``(N, H*W)``,
    the channel mean of ``feat**p``, L2-normalised per sample."""
    return F.normalize(feat.pow(p).mean(1).reshape(feat.shape[0], -1), dim=1)


def at_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor], p: float = 2) -> torch.Tensor:
    """Attention transfer (arXiv 1612.03928), summed over stage pairs.

    Per pair (pooled to a common size first): ``mean((Q_s - Q_t)**2)`` over
    batch and positions, with ``Q = attention_map(f, p)``. Channel counts may differ.
    """
    _check_pairs("at_loss", g_s, g_t)
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = match_spatial(f_s, f_t)
        total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
    return total


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over ``n, i, j`` of ``<a[n, i], b[n, j]>**2`` for ``(N, Ca, D)``, ``(N, Cb, D)``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang, arXiv 1707.01219), summed over stage pairs.

    Each channel's map is flattened and L2-normalised over positions; the
    squared MMD with the degree-2 polynomial kernel ``k(x, y) = (x.y)**2`` is
    ``mean k(t, t') + mean k(s, s') - 2 mean k(s, t)`` over channel pairs and
    batch. Channel counts may differ; maps are pooled to a common size.
    """
    _check_pairs("nst_loss", g_s, g_t)
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = match_spatial(f_s, f_t)
        s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
        t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
        total = total + (
            _poly_kernel_mean(t, t).detach() + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)
        )
    return total


# Below this probability of a negative pre-activation, the margin falls back to -3 std.
_OFD_MIN_NEG_PROB = 0.001


@torch.no_grad()
def ofd_margins(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """OFD's per-channel margin from the teacher's BN before a ReLU (Heo et al., arXiv 1904.01866).

    A pre-activation is modelled as ``N(m, s**2)`` with ``m = beta`` and
    ``s = |gamma|``. The margin is the expectation of its negative part,
    ``m - s * phi(m/s) / Phi(-m/s)``, or ``-3 s`` when ``Phi(-m/s) <= 0.001``.
    Returns ``(C,)`` float32, computed in float64.
    """
    s = bn_weight.detach().double().abs()
    m = bn_bias.detach().double()
    z = m / s
    neg_prob = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    expected_neg = m - s * pdf / neg_prob
    margin = torch.where((neg_prob > _OFD_MIN_NEG_PROB) & torch.isfinite(expected_neg), expected_neg, -3 * s)
    return margin.float()


def ofd_loss(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 between a connected student map and a teacher pre-activation.

    ``source``, ``target``: ``(N, C, H, W)``; ``margin``: ``(C,)``. Positions
    where the teacher is positive are matched exactly; where the teacher is
    negative, the student is only pushed down when it exceeds the teacher (or
    the margin, when the teacher is below it). Summed over ``C, H, W``,
    averaged over the batch.
    """
    if source.shape != target.shape:
        raise ValueError(f"ofd_loss: student map {tuple(source.shape)} != teacher map {tuple(target.shape)}")
    if margin.numel() != target.shape[1]:
        raise ValueError(f"ofd_loss: {margin.numel()} margins for {target.shape[1]} teacher channels")
    margin = margin.to(source).reshape(1, -1, 1, 1)
    above_margin = (source > margin) & (target <= margin)
    above_neg_teacher = (source > target) & (target > margin) & (target <= 0)
    loss = (source - margin).pow(2) * above_margin + (source - target).pow(2) * (
        above_neg_teacher.to(source.dtype) + (target > 0).to(source.dtype)
    )
    return loss.mean(dim=0).sum()


def vid_loss(pred_mean: torch.Tensor, f_t: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation (Ahn et al., arXiv 1904.05835).

    Gaussian negative log-likelihood (without the constant) of the teacher
    map under ``N(pred_mean, var)``, with per-channel ``var = softplus(log_scale) + eps``,
    averaged over all elements. ``pred_mean``, ``f_t``: ``(N, C, H, W)``; ``log_scale``: ``(C,)``.
    """
    if pred_mean.shape != f_t.shape:
        raise ValueError(f"vid_loss: predicted mean {tuple(pred_mean.shape)} != teacher map {tuple(f_t.shape)}")
    var = (F.softplus(log_scale) + eps).reshape(1, -1, 1, 1).to(pred_mean)
    return (0.5 * ((pred_mean - f_t).pow(2) / var + torch.log(var))).mean()
