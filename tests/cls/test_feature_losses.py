"""Feature and relation losses pinned on tiny inputs whose values are worked out by hand."""
import math

import pytest
import torch

from kd_cls.nn.connectors import ConvReg
from kd_cls.losses import (
    at_loss,
    attention_map,
    kdsvd_loss,
    match_spatial,
    nst_loss,
    ofd_loss,
    ofd_margins,
    pkt_loss,
    rkd_loss,
    rkd_loss_parts,
    sp_loss,
    vid_loss,
)

SQRT2 = math.sqrt(2.0)


def t(rows, shape=None):
    x = torch.tensor(rows, dtype=torch.float32)
    return x.reshape(shape) if shape is not None else x


# ---------------------------------------------------------------- AT
def test_at_loss_by_hand_with_pooling():
    # student 1x1x2x2 of ones: f**2 channel mean = [1, 1, 1, 1] -> L2-normalised [.5, .5, .5, .5]
    f_s = torch.ones(1, 1, 2, 2)
    # teacher 4x4, top-left 2x2 block = 2: average-pooled to 2x2 -> [[2, 0], [0, 0]]
    # -> f**2 = [4, 0, 0, 0] -> normalised [1, 0, 0, 0]
    f_t = torch.zeros(1, 1, 4, 4)
    f_t[0, 0, :2, :2] = 2.0
    # diff = [-.5, .5, .5, .5]; squares .25 each; mean = 0.25
    assert at_loss([f_s], [f_t], p=2).item() == pytest.approx(0.25, abs=1e-7)
    # two identical pairs are summed
    assert at_loss([f_s, f_s], [f_t, f_t], p=2).item() == pytest.approx(0.5, abs=1e-7)


def test_attention_map_averages_channels():
    # channels [[1, 0]] and [[3, 0]]: squares averaged over channels = [(1 + 9) / 2, 0] = [5, 0] -> [1, 0]
    f = t([[[[1.0, 0.0]], [[3.0, 0.0]]]])
    assert torch.allclose(attention_map(f, 2), t([[1.0, 0.0]]))
    # p = 1 keeps the sign of the mean: [(1 + 3) / 2, 0] -> [1, 0]; with [[1, 1]] and [[1, 1]] -> [1/sqrt2] * 2
    assert torch.allclose(attention_map(torch.ones(1, 2, 1, 2), 1), torch.full((1, 2), 1 / SQRT2))


# ---------------------------------------------------------------- NST
def test_nst_loss_by_hand():
    # student channels a = [1, 0], b = [0, 1] (already unit); teacher one channel [1, 1] -> [r, r], r = 1/sqrt2
    f_s = t([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    f_t = t([[[[1.0, 1.0]]]])  # (1, 1, 1, 2)
    # mean k(t, t) = (t.t)^2 = 1
    # mean k(s, s) over the 2x2 pairs: [[1, 0], [0, 1]] squared -> 2 / 4 = 0.5
    # mean k(s, t): (a.t)^2 = (b.t)^2 = 0.5 -> 0.5
    # loss = 1 + 0.5 - 2 * 0.5 = 0.5
    assert nst_loss([f_s], [f_t]).item() == pytest.approx(0.5, abs=1e-6)
    # identical features: k(s,s) = k(t,t) = k(s,t) -> 0
    assert nst_loss([f_t], [f_t.clone()]).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- PKT
def test_pkt_loss_by_hand():
    # student rows [1, 0], [0, 1]: cosines [[1, 0], [0, 1]] -> (c + 1) / 2 = [[1, .5], [.5, 1]]
    #   -> rows normalised Q = [[2/3, 1/3], [1/3, 2/3]]
    # teacher rows [1, 0], [1, 0]: cosines all 1 -> all 1 -> P = [[.5, .5], [.5, .5]]
    # mean of P log(P / Q) over 4 entries = (2 * .5 log(.75) + 2 * .5 log(1.5)) / 4 = log(1.125) / 4
    f_s = t([[1.0, 0.0], [0.0, 1.0]])
    f_t = t([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(f_s, f_t).item() == pytest.approx(math.log(1.125) / 4, rel=1e-5)
    # a zero feature row gives a 0 cosine row, not NaN
    assert torch.isfinite(pkt_loss(t([[0.0, 0.0], [0.0, 1.0]]), f_t))


# ---------------------------------------------------------------- RKD
def test_rkd_parts_by_hand():
    # student points A(0,0), B(1,0), C(0,1); teacher points (0,0), (1,0), (2,0) (collinear)
    f_s = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    f_t = t([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    # Distances. student: AB = AC = 1, BC = sqrt2; mean of the 6 off-diagonal entries m = (2 + sqrt2) / 3
    #   -> normalised a = 1/m (AB, AC), b = sqrt2/m (BC)
    # teacher: 1, 2, 1; mean 4/3 -> .75, 1.5, .75
    # every |diff| < 1, so smooth-L1 = diff^2 / 2; each pair appears twice in the 3x3 matrix, the
    # diagonal is 0 in both: loss_d = ((a - .75)^2 + (a - 1.5)^2 + (b - .75)^2) / 9
    m = (2 + SQRT2) / 3
    a, b = 1 / m, SQRT2 / m
    expected_d = ((a - 0.75) ** 2 + (a - 1.5) ** 2 + (b - 0.75) ** 2) / 9  # 0.0716991...
    # Angles: 27 cosines at anchors i of (e_j - e_i, e_k - e_i). Terms with j or k == i are 0 in both,
    # j == k != i are 1 in both. The off-diagonal pair at each anchor (counted twice):
    #   anchor 0: teacher cos = 1 (both on +x), student cos(+x, +y) = 0    -> |d| = 1     -> 1 - .5 = .5
    #   anchor 1: teacher -1 (opposite), student cos(-x, (-1,1)/sqrt2) = r -> |d| = 1 + r -> .5 + r
    #   anchor 2: teacher 1, student cos(-y, (1,-1)/sqrt2) = r             -> |d| = 1 - r -> (1 - r)^2 / 2
    # r = 1/sqrt2: sum = 2 * (.5 + .5 + r + (1 - r)^2 / 2) = 2 * 1.75 = 3.5 -> loss_a = 3.5 / 27
    loss_d, loss_a = rkd_loss_parts(f_s, f_t)
    assert loss_d.item() == pytest.approx(expected_d, rel=1e-5)
    assert loss_a.item() == pytest.approx(3.5 / 27, rel=1e-5)
    total = rkd_loss(f_s, f_t, distance_weight=25, angle_weight=50)
    assert total.item() == pytest.approx(25 * expected_d + 50 * 3.5 / 27, rel=1e-5)


def test_rkd_is_scale_invariant():
    f_s = torch.randn(5, 7)
    assert rkd_loss(f_s, 3.0 * f_s.clone()).item() == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- SP
def test_sp_loss_by_hand():
    # student rows [1, 0], [0, 1]: Gram = I, rows normalised = I
    # teacher rows [1, 0], [1, 0]: Gram = all ones, rows normalised = all 1/sqrt2
    # ||G_t - G_s||^2 = 2 (1/sqrt2 - 1)^2 + 2 (1/sqrt2)^2 = 2 (1.5 - sqrt2) + 1 = 4 - 2 sqrt2
    # divided by N^2 = 4 -> 1 - sqrt2 / 2
    f_s = t([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
    f_t = t([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 1, 2, 1)  # feature shapes may differ
    assert sp_loss([f_s], [f_t]).item() == pytest.approx(1 - SQRT2 / 2, rel=1e-6)


# ---------------------------------------------------------------- KDSVD
def _rows(vectors, sigmas):
    """Features (1, C, 1, W) whose (C, W) matrix is diag(sigmas) @ V^T: right singular vectors = vectors."""
    return torch.stack([s * torch.tensor(v) for s, v in zip(sigmas, vectors)]).reshape(1, len(sigmas), 1, -1)


def test_kdsvd_loss_by_hand():
    # W = 4. e_A = [r, -r, 0, 0], e_B = [0, 0, r, -r], r = 1/sqrt2; sym1 = [r, r, 0, 0], sym2 = [0, 0, r, r].
    # A sign flip of any of the antisymmetric vectors only permutes its entries (0<->1, 2<->3), and the
    # student vector is sign-aligned to the teacher's, so the loss does not depend on SVD sign choices.
    r = 1 / SQRT2
    e_a, e_b = [r, -r, 0.0, 0.0], [0.0, 0.0, r, -r]
    sym1, sym2 = [r, r, 0.0, 0.0], [0.0, 0.0, r, r]
    a1 = [0.8 * x + 0.6 * y for x, y in zip(e_a, e_b)]  # cos with e_A = 0.8
    a2 = [-0.6 * x + 0.8 * y for x, y in zip(e_a, e_b)]  # cos with e_A = -0.6
    # stage 1: teacher's top vector e_A; the student's 4 vectors (k + 3 = 4) are a1, a2, sym1, sym2 and
    # the one of largest |cos| with e_A is a1.
    t1 = _rows([e_a, e_b], [3.0, 1.0])
    s1 = _rows([a1, a2, sym1, sym2], [4.0, 3.0, 2.0, 1.0])
    # stage 2: teacher's top vector e_B; the student's best match is e_B itself.
    t2 = _rows([e_b, e_a], [3.0, 1.0])
    s2 = _rows([e_b, e_a, sym1, sym2], [4.0, 3.0, 2.0, 1.0])
    # k = 1: the normalised top singular value is 1, so vectors are unscaled. With
    # rbf(x, y) = exp(-(x - y)^2 / 8), loss = sum_{w, w'} (rbf(e_B[w], a1[w']) - rbf(e_B[w], e_A[w']))^2 / N, N = 1
    rbf = lambda x, y: math.exp(-((x - y) ** 2) / 8)  # noqa: E731
    expected = sum((rbf(x, y) - rbf(x, z)) ** 2 for x in e_b for y, z in zip(a1, e_a))  # 0.027051
    assert expected == pytest.approx(0.027051, abs=1e-6)
    assert kdsvd_loss([s1, s2], [t1, t2], k=1).item() == pytest.approx(expected, rel=1e-4)
    # same features: 0
    assert kdsvd_loss([t1, t2], [t1.clone(), t2.clone()], k=1).item() == pytest.approx(0.0, abs=1e-7)


def test_kdsvd_rejects_unequal_widths():
    with pytest.raises(ValueError, match="width 4 != teacher width 8"):
        kdsvd_loss([torch.randn(2, 3, 4, 4)] * 2, [torch.randn(2, 3, 8, 8)] * 2)


# ---------------------------------------------------------------- OFD
def test_ofd_margins_by_hand():
    # margin = E[x | x < 0] for x ~ N(beta, gamma^2) = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|)
    #   gamma = 1,  beta = 0:  0 - 1 * (1/sqrt(2 pi)) / 0.5                 = -sqrt(2/pi) = -0.797885
    #   gamma = -2, beta = 0:  |gamma| = 2 -> twice that                     = -1.595769
    #   gamma = 1,  beta = -1: -1 - phi(1) / Phi(1) = -1 - 0.241971 / 0.841345 = -1.287600
    #   gamma = 1,  beta = 4:  Phi(-4) = 3.2e-5 <= 0.001 -> -3 |gamma|       = -3
    m = ofd_margins(t([1.0, -2.0, 1.0, 1.0]), t([0.0, 0.0, -1.0, 4.0]))
    expected = [-math.sqrt(2 / math.pi), -2 * math.sqrt(2 / math.pi), -1.287600, -3.0]
    assert m.dtype == torch.float32
    assert m.tolist() == pytest.approx(expected, abs=1e-5)


def test_ofd_loss_by_hand():
    # one channel, margin -1, five positions (teacher t, student s):
    #   t =  .5 > 0             s = .2   -> (s - t)^2 = .09
    #   -1 < t = -.5 <= 0, s > t: s = 0  -> (s - t)^2 = .25
    #   -1 < t = -.5,      s < t: s = -.7 -> 0
    #   t = -2 <= -1, s > -1:     s = 0  -> (s - margin)^2 = 1
    #   t = -2,       s < -1:     s = -1.5 -> 0
    # summed over positions, batch mean of 1 sample: 1.34
    target = t([0.5, -0.5, -0.5, -2.0, -2.0], (1, 1, 1, 5))
    source = t([0.2, 0.0, -0.7, 0.0, -1.5], (1, 1, 1, 5))
    assert ofd_loss(source, target, t([-1.0])).item() == pytest.approx(1.34, abs=1e-6)
    # batch of two copies: same mean
    assert ofd_loss(source.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1), t([-1.0])).item() == pytest.approx(
        1.34, abs=1e-6
    )


# ---------------------------------------------------------------- VID
def test_vid_loss_by_hand():
    # pred - target = 2 everywhere; channel 0 variance softplus(log(e - 1)) = 1, channel 1 variance e (eps = 0)
    #   channel 0: .5 * (4 / 1 + log 1) = 2;  channel 1: .5 * (4 / e + 1) = 2/e + .5
    #   mean over both channels' elements: (2 + 2/e + .5) / 2
    log_scale = t([math.log(math.e - 1), math.log(math.exp(math.e) - 1)])
    target = torch.randn(2, 2, 3, 3)
    loss = vid_loss(target + 2, target, log_scale, eps=0.0)
    assert loss.item() == pytest.approx((2 + 2 / math.e + 0.5) / 2, rel=1e-5)


# ---------------------------------------------------------------- shapes
def test_match_spatial_pools_the_larger():
    a, b = match_spatial(torch.ones(2, 3, 8, 8), torch.ones(2, 5, 4, 4))
    assert a.shape == (2, 3, 4, 4) and b.shape == (2, 5, 4, 4)
    a, b = match_spatial(torch.ones(2, 3, 2, 2), torch.arange(16.0).reshape(1, 1, 4, 4))
    # 2x2 average of [[0, 1], [4, 5]] = 2.5
    assert b.shape == (1, 1, 2, 2) and b[0, 0, 0, 0].item() == 2.5


@pytest.mark.parametrize(
    "s_hw,t_hw,kind",
    [(8, 4, "Conv2d"), (4, 8, "ConvTranspose2d"), (8, 6, "Conv2d"), (4, 4, "Conv2d")],
)
def test_convreg_maps_student_to_teacher_shape(s_hw, t_hw, kind):
    reg = ConvReg((1, 6, s_hw, s_hw), (1, 10, t_hw, t_hw))
    assert type(reg.conv).__name__ == kind
    assert reg(torch.randn(2, 6, s_hw, s_hw)).shape == (2, 10, t_hw, t_hw)


def test_convreg_rejects_small_student():
    with pytest.raises(ValueError, match="student map 4x4 to teacher map 16x16"):
        ConvReg((1, 6, 4, 4), (1, 10, 16, 16))
