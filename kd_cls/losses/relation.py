"""Relational distillation losses: PKT, RKD, SP and KDSVD.

These compare relations between the samples of a batch (or between the
singular vectors of successive stages), so the student's and the teacher's
feature widths may differ. Every loss returns a scalar tensor.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["pkt_loss", "rkd_loss", "rkd_loss_parts", "sp_loss", "kdsvd_loss"]


def _zero_nan(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _flat(f: torch.Tensor) -> torch.Tensor:
    return f.reshape(f.shape[0], -1)


def _pkt_affinity(f: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-stochastic ``(N, N)`` matrix from cosine similarities rescaled to [0, 1]."""
    f = _zero_nan(f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps))
    sim = (f @ f.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, arXiv 1803.10837).

    ``f_s``: ``(N, Ds)``, ``f_t``: ``(N, Dt)`` (e.g. pooled features). With
    ``P`` the teacher's and ``Q`` the student's conditional affinities (cosine
    similarity mapped to [0, 1], each row normalised to sum 1), returns
    ``mean_ij P_ij * log((P_ij + eps) / (Q_ij + eps))`` (a mean over all
    ``N*N`` entries, not a per-row sum).
    """
    f_s, f_t = _flat(f_s), _flat(f_t)
    p = _pkt_affinity(f_t, eps)
    q = _pkt_affinity(f_s, eps)
    return (p * torch.log((p + eps) / (q + eps))).mean()


def _pairwise_distance(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """``(N, D)`` -> ``(N, N)`` Euclidean distances; squared ones clamped below at ``eps``; diagonal 0."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    off_diag = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d * off_diag


def _normalised_distance(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    d = _pairwise_distance(e, squared, eps)
    return d / d[d > 0].mean()


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` -> ``(N**3,)``: cosines of the angles ``e_j - e_i``, ``e_k - e_i`` at each anchor ``i``."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss_parts(
    f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False, eps: float = 1e-12
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(distance_loss, angle_loss)`` of relational KD (Park et al., arXiv 1904.05068).

    Distance: smooth-L1 between the ``(N, N)`` pairwise distance matrices,
    each divided by the mean of its positive entries. Angle: smooth-L1
    between the ``N**3`` cosines of the angles formed by sample triplets.
    ``f_s``: ``(N, ...)``, ``f_t``: ``(N, ...)``, flattened per sample.
    """
    stu, tea = _flat(f_s), _flat(f_t)
    with torch.no_grad():
        t_d = _normalised_distance(tea, squared, eps)
        t_angle = _angles(tea)
    loss_d = F.smooth_l1_loss(_normalised_distance(stu, squared, eps), t_d)
    loss_a = F.smooth_l1_loss(_angles(stu), t_angle)
    return loss_d, loss_a


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    squared: bool = False,
    eps: float = 1e-12,
    distance_weight: float = 25,
    angle_weight: float = 50,
) -> torch.Tensor:
    """``distance_weight * distance_loss + angle_weight * angle_loss`` (see :func:`rkd_loss_parts`)."""
    loss_d, loss_a = rkd_loss_parts(f_s, f_t, squared, eps)
    return distance_weight * loss_d + angle_weight * loss_a


def _similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    n = f_s.shape[0]
    s, t = _flat(f_s), _flat(f_t)
    g_s = F.normalize(s @ s.t(), dim=1)
    g_t = F.normalize(t @ t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (n * n)


def sp_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, arXiv 1907.09682), summed over pairs.

    Per pair of ``(N, ...)`` features: the ``(N, N)`` Gram matrices of the
    flattened samples, each row L2-normalised, compared by
    ``||G_t - G_s||_F**2 / N**2``.
    """
    if len(g_s) == 0 or len(g_s) != len(g_t):
        raise ValueError(f"sp_loss: needs matching non-empty lists; got {len(g_s)} student and {len(g_t)} teacher")
    return sum(_similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


def _right_singular(feat: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Leading right singular vectors and values of ``(N, C*H, W)``-reshaped features.

    Returns ``v``: ``(N, W, n)``, each vector L2-normalised, and ``s``: ``(N, n)``
    normalised per sample. Non-finite entries become 0.
    """
    x = feat.reshape(feat.shape[0], feat.shape[1] * feat.shape[2], feat.shape[3]).float()
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = _zero_nonfinite(vh.transpose(-2, -1))
    s = _zero_nonfinite(s)
    return F.normalize(v[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1)


def _align_signs(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest ``|cos|``, sign-flipped to agree.

    ``v_s``: ``(N, W, ks)``, ``v_t``: ``(N, W, kt)`` -> ``(N, W, kt)``.
    """
    cosine = v_s.transpose(-2, -1) @ v_t
    best = cosine.abs().amax(dim=1, keepdim=True)
    select = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ select


def kdsvd_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor], k: int = 1) -> torch.Tensor:
    """Self-supervised KD with SVD (Lee et al., arXiv 1807.06819).

    Each stage's ``(N, C, H, W)`` map is read as ``(N, C*H, W)``; its leading
    ``k`` right singular vectors (the student's best ``k`` of ``k + 3``, with
    aligned signs) are scaled by the teacher's normalised singular values.
    For each pair of consecutive stages, an RBF kernel ``exp(-(a - b)**2 / 8)``
    between their vectors is matched by squared error; non-finite terms are
    dropped. The sum is divided by the batch size. Student and teacher maps of
    a stage must have the same width ``W``; channel counts may differ.
    """
    if len(g_s) == 0 or len(g_t) == 0:
        raise ValueError(f"kdsvd_loss: needs feature lists; got {len(g_s)} student and {len(g_t)} teacher")
    total = g_s[0].new_zeros((), dtype=torch.float32)
    prev_s = prev_t = None
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        if f_s.shape[3] != f_t.shape[3]:
            raise ValueError(
                f"kdsvd_loss: stage {i} student width {f_s.shape[3]} != teacher width {f_t.shape[3]}; "
                "KDSVD needs teacher and student stages of equal spatial size"
            )
        v_t, s_t = _right_singular(f_t, k)
        v_s, _ = _right_singular(f_s, k + 3)
        v_s = _align_signs(v_s, v_t)
        scale = s_t.unsqueeze(1)
        v_t, v_s = v_t * scale, v_s * scale
        if prev_s is not None:
            rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
            rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
            total = total + _zero_nonfinite((rbf_s - rbf_t.detach()).pow(2)).sum()
        prev_s, prev_t = v_s, v_t
    return total / g_s[0].shape[0]
