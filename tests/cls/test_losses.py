"""kd_loss, dkd_loss and hcl_loss: hand-computed values, invariants, and the papers' formulas
recomputed here another way (explicit probabilities, loops, masks by deletion)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd_cls.losses import dkd_loss, hcl_loss, kd_loss
from kd_cls.losses.logit import dkd_loss_parts


def _kl(p, q):
    """sum_c p log(p / q) for 1-D probability tensors (float64)."""
    return float((p * (p.log() - q.log())).sum())


def test_kd_loss_hand_value():
    # One sample, two classes, T = 1: p_t = softmax(0, 0) = (1/2, 1/2), p_s = softmax(ln 3, 0) = (3/4, 1/4).
    s = torch.tensor([[math.log(3.0), 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_matches_definition_and_scales_with_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temp in (1.0, 2.0, 4.0):
        ref = 0.0
        for i in range(5):
            ref += _kl(F.softmax(t[i].double() / temp, 0), F.softmax(s[i].double() / temp, 0))
        ref = ref / 5 * temp**2
        assert kd_loss(s, t, temp).item() == pytest.approx(ref, rel=1e-5)
    # T^2 scaling: scaling logits and T together leaves the distributions, so the loss scales by T^2.
    assert kd_loss(3 * s, 3 * t, 3.0).item() == pytest.approx(9 * kd_loss(s, t, 1.0).item(), rel=1e-5)


def test_kd_loss_zero_when_equal_and_positive_otherwise():
    x = torch.randn(4, 10)
    assert kd_loss(x, x.clone(), 4.0).abs().item() < 1e-6
    assert kd_loss(x, x + torch.randn(4, 10), 4.0).item() > 0


def _dkd_reference(s, t, y, alpha, beta, temp):
    """DKD per the paper: TCKD on (p_target, 1 - p_target); NCKD on the non-target classes renormalised."""
    n, c = s.shape
    tckd = nckd = 0.0
    for i in range(n):
        ps, pt = F.softmax(s[i].double() / temp, 0), F.softmax(t[i].double() / temp, 0)
        k = int(y[i])
        bs = torch.stack([ps[k], 1 - ps[k]])
        bt = torch.stack([pt[k], 1 - pt[k]])
        tckd += _kl(bt, bs)
        keep = [j for j in range(c) if j != k]  # drop the target class outright
        qs = F.softmax(s[i, keep].double() / temp, 0)
        qt = F.softmax(t[i, keep].double() / temp, 0)
        nckd += _kl(qt, qs)
    return alpha * tckd / n * temp**2, beta * nckd / n * temp**2


def test_dkd_matches_paper_formula():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    y = torch.randint(0, 5, (6,), generator=g)
    for alpha, beta, temp in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        rt, rn = _dkd_reference(s, t, y, alpha, beta, temp)
        assert dkd_loss(s, t, y, alpha, beta, temp).item() == pytest.approx(rt + rn, rel=1e-4)


def test_dkd_is_tckd_plus_nckd_and_zero_when_equal():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    tckd, nckd = dkd_loss_parts(s, t, y, 4.0)
    assert dkd_loss(s, t, y, 1.0, 0.0, 4.0).item() == pytest.approx(tckd.item(), rel=1e-6)
    assert dkd_loss(s, t, y, 0.0, 1.0, 4.0).item() == pytest.approx(nckd.item(), rel=1e-6)
    assert dkd_loss(s, t, y, 2.0, 3.0, 4.0).item() == pytest.approx(2 * tckd.item() + 3 * nckd.item(), rel=1e-5)
    assert abs(dkd_loss(s, s.clone(), y, 1.0, 8.0, 4.0).item()) < 1e-5


def test_dkd_nckd_ignores_target_logit():
    # Changing only the target logits changes TCKD but not NCKD.
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, 3])
    s2 = s.clone()
    s2[torch.arange(4), y] += 3.0
    _, n1 = dkd_loss_parts(s, t, y, 2.0)
    _, n2 = dkd_loss_parts(s2, t, y, 2.0)
    assert n1.item() == pytest.approx(n2.item(), rel=1e-5)


def test_hcl_hand_case():
    # 4x4 maps, one channel: student all ones, teacher zeros. Full MSE 1; the pooled maps at
    # levels 2 and 1 (4 is skipped: not smaller than H) are also all ones, MSE 1 each.
    # Weights 1, 1/2, 1/4 -> (1 + 0.5 + 0.25) / 1.75 = 1.
    fs, ft = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    assert hcl_loss([fs], [ft]).item() == pytest.approx(1.0)
    # A checkerboard difference averages out when pooled: full MSE 1, pooled MSEs 0 -> 1 / 1.75.
    cb = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0
    assert hcl_loss([cb.view(1, 1, 4, 4)], [torch.zeros(1, 1, 4, 4)]).item() == pytest.approx(1 / 1.75)


def test_hcl_matches_reviewkd_formula_and_sums_levels():
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(2, 3, h, h, generator=g), torch.randn(2, 3, h, h, generator=g)) for h in (8, 4, 1)]

    def ref(fs, ft):
        h = fs.shape[2]
        tot, w, wsum = ((fs - ft) ** 2).mean().item(), 1.0, 1.0
        for lvl in (4, 2, 1):
            if lvl >= h:
                continue
            w /= 2
            a, b = F.adaptive_avg_pool2d(fs, lvl), F.adaptive_avg_pool2d(ft, lvl)
            tot += w * ((a - b) ** 2).mean().item()
            wsum += w
        return tot / wsum

    expected = sum(ref(a, b) for a, b in pairs)
    got = hcl_loss([a for a, _ in pairs], [b for _, b in pairs]).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert hcl_loss([a for a, _ in pairs], [a.clone() for a, _ in pairs]).item() == 0.0
