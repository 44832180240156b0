"""Fast paths give the plain path's results: BN folding of the teacher's copy, channels_last."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from kd_cls.engine import get_cfg
from kd_cls.distillers.base import build_distiller
from kd_cls.nn.bn_fold import count_batchnorms, find_conv_bn_pairs, fold_batchnorm, fold_conflicts
from kd_cls.hooks import run_and_capture
from kd_cls.models.registry import build_model, get_taps


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _all_taps(model):
    t = get_taps(model)
    return list(dict.fromkeys(t["feats"] + t["preact_feats"] + [t["pooled_feat"]]))


def _assert_close(a, b, what):
    scale = max(1.0, float(a.detach().abs().max()))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")


def _assert_same_outputs(model, copy, taps, x, what):
    """``copy`` gives ``model``'s logits and every tapped feature on ``x``, within float tolerance."""
    with torch.no_grad():
        y0, f0 = run_and_capture(model, taps, x)
        y1, f1 = run_and_capture(copy, taps, x)
    _assert_close(y0, y1, f"{what} logits")
    for tap, a, b in zip(taps, f0, f1):
        _assert_close(a, b, f"{what} tap {tap}")


@pytest.mark.parametrize("name", ["resnet32x4", "vgg13", "wrn_40_2", "MobileNetV2", "ShuffleV1"])
def test_folded_zoo_model_equals_original(name):
    model = _randomize_bn(build_model(name, num_classes=100), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    taps = _all_taps(model)
    folded = fold_batchnorm(model, keep_taps=taps)

    assert len(folded.folded_pairs) > 0
    # Same module paths, folded BNs replaced by Identity.
    assert set(dict(folded.named_modules())) == set(dict(model.named_modules()))
    for bn_path in folded.folded_pairs.values():
        assert isinstance(folded.get_submodule(bn_path), nn.Identity)
    assert count_batchnorms(folded) == count_batchnorms(model) - len(folded.folded_pairs)
    assert not any(p.requires_grad for p in folded.parameters())

    _assert_same_outputs(model, folded, taps, torch.randn(2, 3, 32, 32), name)

    # The original is untouched: same tensors, BNs still there, mode unchanged.
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(isinstance(model.get_submodule(b), nn.BatchNorm2d) for b in folded.folded_pairs.values())


def test_folded_torchvision_resnet18_equals_original():
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10), seed=2)
    folded = fold_batchnorm(model)
    assert len(folded.folded_pairs) == 20  # every BN of ResNet-18 follows a conv
    assert count_batchnorms(folded) == 0
    taps = ["layer1", "layer2.0.bn2", "layer4", "fc:in"]
    _assert_same_outputs(model, folded, taps, torch.randn(2, 3, 64, 64), "resnet18")


def test_channels_last_copy_equals_original():
    model = _randomize_bn(build_model("resnet8x4", num_classes=100), seed=6)
    taps = _all_taps(model)
    folded = fold_batchnorm(model, keep_taps=taps, channels_last=True)
    assert folded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous()  # the original keeps its layout
    x = torch.randn(2, 3, 32, 32)  # an NCHW batch, as the loaders give it
    _assert_same_outputs(model, folded, taps, x, "channels_last copy")


def test_fold_formula_by_hand():
    # y = bn(conv(x)): conv 1x1 weight 2, bias 1; bn mean 1, var 3, eps 1, gamma 4, beta 0.5.
    # s = 4 / sqrt(3 + 1) = 2, W' = 2 * 2 = 4, b' = (1 - 1) * 2 + 0.5 = 0.5.
    conv = nn.Conv2d(1, 1, 1, bias=True)
    bn = nn.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)
        bn.weight.fill_(4.0)
        bn.bias.fill_(0.5)
    folded = fold_batchnorm(nn.Sequential(conv, bn))
    assert folded.folded_pairs == {"0": "1"}
    assert folded[0].weight.item() == 4.0
    assert folded[0].bias.item() == 0.5
    assert isinstance(folded[1], nn.Identity)
    # x = 3: conv -> 7, bn -> (7 - 1) / 2 * 4 + 0.5 = 12.5
    assert folded(torch.full((1, 1, 1, 1), 3.0)).item() == pytest.approx(12.5)


def test_linear_bn1d_is_folded():
    model = _randomize_bn(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()), seed=3)
    folded = fold_batchnorm(model)
    assert folded.folded_pairs == {"0": "1"}
    x = torch.randn(6, 5)
    _assert_close(model(x), folded(x), "linear+bn1d")


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class _Branchy(nn.Module):
    """Untraceable as a whole (data-dependent branch); its ``block`` is traceable."""

    def __init__(self, reuse_conv: bool = False):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.reuse_conv = reuse_conv

    def forward(self, x):
        y = self.block(x)
        if x.sum() > 0:
            y = y * 2
        if self.reuse_conv:  # the block's conv again, where tracing the block alone cannot see it
            y = y + self.block[0](x)
        return y


def test_pairs_that_must_not_fold():
    # A conv whose output also feeds something else keeps its BN.
    shared = _randomize_bn(_Shared())
    assert find_conv_bn_pairs(shared) == {}
    x = torch.randn(2, 3, 8, 8)
    _assert_close(shared(x), fold_batchnorm(shared)(x), "shared conv")
    # A BN without running statistics normalizes with batch statistics: not foldable.
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    assert find_conv_bn_pairs(m) == {}


def test_untraceable_model_folds_inside_its_blocks():
    model = _randomize_bn(_Branchy())
    folded = fold_batchnorm(model)
    assert folded.folded_pairs == {"block.0": "block.1"}
    x = torch.randn(2, 3, 8, 8).abs()
    _assert_close(model(x), folded(x), "branchy")


def test_example_input_rejects_a_wrong_fold():
    model = _randomize_bn(_Branchy(reuse_conv=True))
    # Tracing the block alone cannot see the second use of its conv ...
    assert find_conv_bn_pairs(model) == {"block.0": "block.1"}
    x = torch.randn(2, 3, 8, 8).abs()
    assert not torch.allclose(fold_batchnorm(model)(x), model(x), atol=1e-3)
    # ... the check on an example batch catches it and keeps the unfolded copy.
    checked = fold_batchnorm(model, example_input=x)
    assert checked.folded_pairs == {}
    _assert_close(model(x), checked(x), "checked copy")


def test_tapped_conv_output_keeps_its_bn():
    # In wrn_16_2 (as in every WRN wider than 1) the stem conv feeds only block1's first BN, and the stem conv's output is a tap.
    model = _randomize_bn(build_model("wrn_16_2", num_classes=100), seed=4)
    pairs = find_conv_bn_pairs(model)
    assert pairs.get("conv1") == "block1.layer.0.bn1"
    assert fold_conflicts(pairs, ["conv1", "block1", "block1.layer.0.bn1:in", "fc:in"]) == [
        "conv1",
        "block1.layer.0.bn1:in",
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = run_and_capture(model, ["conv1"], x)[1][0]
        unsafe = run_and_capture(fold_batchnorm(model), ["conv1"], x)[1][0]
        safe_model = fold_batchnorm(model, keep_taps=["conv1"])
        safe = run_and_capture(safe_model, ["conv1"], x)[1][0]
    assert "conv1" not in safe_model.folded_pairs
    assert not torch.allclose(unsafe, ref, atol=1e-3)
    _assert_close(ref, safe, "conv1 tap kept")


def _dkd(fold: bool, student_name="resnet8", teacher_name="resnet20"):
    cfg = get_cfg()
    cfg.DISTILLER.TYPE = "DKD"
    cfg.SOLVER.FOLD_TEACHER_BN = fold
    torch.manual_seed(0)
    student = build_model(student_name, num_classes=100)
    teacher = _randomize_bn(build_model(teacher_name, num_classes=100), seed=5)
    return build_distiller(cfg, student, teacher, num_data=100)


def test_distiller_teacher_fast_path_equals_plain_path():
    fast, plain = _dkd(True), _dkd(False)
    plain.load_state_dict(fast.state_dict())
    teacher_before = {k: v.clone() for k, v in fast.teacher.state_dict().items()}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    taps = _all_taps(fast.teacher)

    lt_fast, ft_fast = fast.run_teacher(x, taps)
    lt_plain, ft_plain = plain.run_teacher(x, taps)
    assert fast.teacher_for_inference() is not fast.teacher
    assert len(fast.teacher_for_inference().folded_pairs) > 0
    assert plain.teacher_for_inference() is plain.teacher
    _assert_close(lt_plain, lt_fast, "teacher logits")
    for tap, a, b in zip(taps, ft_plain, ft_fast):
        _assert_close(a, b, f"teacher tap {tap}")
    assert not lt_fast.is_inference()  # usable in the student's autograd graph

    fast.train()
    plain.train()
    _, losses_fast = fast(image=x, target=y, epoch=30)
    _, losses_plain = plain(image=x, target=y, epoch=30)
    for k in losses_plain:
        _assert_close(losses_plain[k].detach(), losses_fast[k].detach(), k)

    # The registered teacher is what checkpoints hold: unchanged, BNs in place.
    assert set(fast.state_dict()) == set(plain.state_dict())
    for k, v in fast.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert count_batchnorms(fast.teacher) == count_batchnorms(plain.teacher)
    assert not fast.teacher.training


def test_distiller_copy_follows_teacher_loads_and_moves():
    fast, plain = _dkd(True), _dkd(False)
    x = torch.randn(2, 3, 32, 32)
    first = fast.teacher_for_inference(x)
    assert fast.teacher_for_inference(x) is first  # nothing changed: the same copy
    # A load straight into the teacher (not through the distiller) must reach the copy.
    new_teacher = _randomize_bn(build_model("resnet20", num_classes=100), seed=9)
    fast.teacher.load_state_dict(new_teacher.state_dict())
    plain.teacher.load_state_dict(new_teacher.state_dict())
    _assert_close(plain.run_teacher(x)[0], fast.run_teacher(x)[0], "logits after teacher.load_state_dict")
    assert fast.teacher_for_inference() is not first
    fast.double()
    assert fast.teacher_for_inference().fc.weight.dtype == torch.float64


def test_distiller_rebuilds_copy_for_a_conflicting_tap():
    fast, plain = _dkd(True, "wrn_16_1", "wrn_16_2"), _dkd(False, "wrn_16_1", "wrn_16_2")
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 32, 32)
    fast.run_teacher(x)  # no taps: the stem conv is folded
    assert "conv1" in fast.teacher_for_inference().folded_pairs
    feat_fast = fast.run_teacher(x, ["conv1"])[1][0]
    feat_plain = plain.run_teacher(x, ["conv1"])[1][0]
    assert "conv1" not in fast.teacher_for_inference().folded_pairs
    _assert_close(feat_plain, feat_fast, "conv1 after rebuild")


@pytest.mark.parametrize("name", ["resnet8x4"])
def test_channels_last_gives_same_logits_and_grads(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100).train()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))
    out = model(x)
    out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    _assert_close(out.detach(), out_cl.detach(), f"{name} channels_last logits")
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(out_cl, y).backward()
    for (n, p), p_cl in zip(model.named_parameters(), model_cl.parameters()):
        _assert_close(p.grad, p_cl.grad, f"{name} grad {n}")
    # Training-mode BN statistics follow the same batch either way.
    for (n, b), b_cl in zip(model.named_buffers(), model_cl.buffers()):
        if b.is_floating_point():
            _assert_close(b, b_cl, f"{name} buffer {n}")
