"""RoIAlign's sparse-matrix CPU backward equals torchvision's; the forward is torchvision's own."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
from detectron2.layers import ROIAlign  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import kd_det.roi_align as ra  # noqa: E402
from kd_det import build_kd_model, get_kd_cfg  # noqa: E402
from kd_det.roi_align import FastROIAlign, sampling_matrix, use_fast_roi_align  # noqa: E402
from kd_det.testing import TINY_OPTS, synthetic_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
R18_REVIEWKD = os.path.join(REPO, "configs", "detection", "ReviewKD", "ReviewKD-R18-R101.yaml")
SMALL_TEACHER = ["TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rois(n, n_img, h, w, scale, seed=0):
    """Boxes in image pixels: inside, straddling and beyond the map's border, tiny and large."""
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(n, 2, generator=g) * 1.3 - 0.2) * torch.tensor([w, h]) / scale
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) / scale
    wh[: n // 5] *= 0.05  # sub-pixel boxes
    idx = torch.randint(0, n_img, (n, 1), generator=g).double()
    return torch.cat([idx, xy, xy + wh], 1)


def _grads(pool, x, rois, g):
    x = x.detach().clone().requires_grad_(True)
    y = pool(x, rois)
    (gx,) = torch.autograd.grad(y, x, g)
    return y, gx


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_gradient_equals_torchvision(aligned, sampling_ratio):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 17, dtype=torch.float64)
    rois = _rois(30, 2, 11, 17, 0.25)
    ref_pool, fast_pool = ROIAlign((3, 4), 0.25, sampling_ratio, aligned), FastROIAlign((3, 4), 0.25, sampling_ratio, aligned)
    g_out = torch.randn(30, 3, 3, 4, dtype=torch.float64)
    y_ref, g_ref = _grads(ref_pool, x, rois, g_out)
    y_fast, g_fast = _grads(fast_pool, x, rois, g_out)
    assert torch.equal(y_ref, y_fast)  # the forward is torchvision's op
    assert g_ref.abs().max() > 1.0
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)
    # Finite differences cost one forward per input element: a smaller map, the same pooling.
    small, small_rois = torch.randn(1, 2, 7, 9, dtype=torch.float64, requires_grad=True), _rois(6, 1, 7, 9, 0.25)
    assert torch.autograd.gradcheck(lambda t: fast_pool(t, small_rois), (small,))


def test_single_sample_by_hand():
    """One 1x1 bin, one sample at (y, x) = (1.0, 1.5): weight 1/2 on pixels (1, 1) and (1, 2)."""
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    rois = torch.tensor([[0.0, 0.5, 0.5, 2.5, 1.5]])
    FastROIAlign((1, 1), 1.0, 1, False)(x, rois).sum().backward()
    want = torch.zeros(4, 4)
    want[1, 1] = want[1, 2] = 0.5
    assert torch.equal(x.grad[0, 0], want)
    # A sample beyond the last row and column (but within one pixel) lands wholly on the corner pixel;
    # one further than that is dropped.
    x.grad = None
    rois = torch.tensor([[0.0, 3.2, 3.2, 3.8, 3.8], [0.0, 5.5, 0.0, 6.5, 1.0]])
    FastROIAlign((1, 1), 1.0, 1, False)(x, rois).sum().backward()
    want = torch.zeros(4, 4)
    want[3, 3] = 1.0
    assert torch.equal(x.grad[0, 0], want)


def test_adaptive_grid_counts_samples_per_bin():
    """sampling_ratio 0: ceil(roi_size / pooled) samples per bin axis, each weighted 1/count."""
    rois = torch.tensor([[0.0, 0.0, 0.0, 5.0, 2.0]])  # 5 x 2 pixels, one bin: 5 x 2 samples
    bins, pix, wts = sampling_matrix(rois, (1, 8, 8), (1, 1), 1.0, 0, False)
    assert bins.numel() == 4 * 5 * 2 and int(bins.max()) == 0
    dense = torch.zeros(64).index_add_(0, pix, wts.float())
    assert dense.sum().item() == pytest.approx(1.0)  # an average of the samples
    # Samples at x = 0.5, 1.5, ..., 4.5 and y = 0.5, 1.5: each of columns 0..5 and rows 0..2 takes a share.
    assert set((dense.view(8, 8) > 0).nonzero()[:, 1].tolist()) == set(range(6))


def test_chunks_and_channels_last(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, 20)
    rois = _rois(40, 2, 12, 20, 0.5, seed=3).float()
    g_out = torch.randn(40, 5, 7, 7)
    _, g_ref = _grads(ROIAlign((7, 7), 0.5, 0, True), x, rois, g_out)
    monkeypatch.setattr(ra, "_CHUNK_NNZ", 500)  # many chunks, some of a single RoI
    gh, gw = ra._geometry(rois, (7, 7), 0.5, 0, True)[4:]
    assert len(list(ra._chunks(4 * 49 * gh * gw))) > 5
    _, g_chunked = _grads(FastROIAlign((7, 7), 0.5, 0, True), x, rois, g_out)
    torch.testing.assert_close(g_chunked, g_ref, rtol=1e-5, atol=1e-5)
    y_nhwc, g_nhwc = _grads(FastROIAlign((7, 7), 0.5, 0, True), x.contiguous(memory_format=torch.channels_last), rois, g_out)
    assert g_nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g_nhwc, g_ref, rtol=1e-5, atol=1e-5)


def test_falls_back_to_torchvision_without_grad_or_rois():
    x = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0.0, 1.0, 1.0, 4.0, 5.0]])
    fast, ref = FastROIAlign((2, 2), 1.0, 0, True), ROIAlign((2, 2), 1.0, 0, True)
    with torch.no_grad():
        assert torch.equal(fast(x, rois), ref(x, rois))
    xg = x.clone().requires_grad_(True)
    y = fast(xg, rois[:0])
    y.sum().backward()
    assert y.shape == (0, 2, 2, 2) and torch.equal(xg.grad, torch.zeros_like(x))


def test_bad_batch_index_is_named():
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 2\)"):
        sampling_matrix(torch.tensor([[2.0, 0.0, 0.0, 1.0, 1.0]]), (2, 4, 4), (1, 1), 1.0, 0, True)


def test_model_switch_keeps_state_and_training_step_gradients():
    opts = TINY_OPTS + SMALL_TEACHER
    torch.manual_seed(0)
    fast_model = build_kd_model(get_kd_cfg(R18_REVIEWKD, opts)).train()
    torch.manual_seed(0)
    plain_model = build_kd_model(get_kd_cfg(R18_REVIEWKD, opts + ["KD.FAST_ROI_ALIGN", "False"])).train()
    n_fast = sum(type(m) is FastROIAlign for m in fast_model.modules())
    assert n_fast >= 4 and not any(type(m) is FastROIAlign for m in plain_model.modules())
    assert fast_model.state_dict().keys() == plain_model.state_dict().keys()
    plain_model.load_state_dict(fast_model.state_dict())
    plain_model.mark_teacher_keys_loaded(plain_model.teacher.state_dict().keys())
    inputs = synthetic_batch(2, 64, 96, num_classes=80)
    grads = []
    for model in (fast_model, plain_model):
        torch.manual_seed(5)  # same RoI sampling
        with EventStorage(0):
            losses = model(inputs)
        sum(losses.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        scale = max(1.0, float(g.abs().max()))
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    assert use_fast_roi_align(fast_model, False) == n_fast
    assert not any(type(m) is FastROIAlign for m in fast_model.modules())
