"""The detection teacher's inference copy: folded FrozenBNs, NHWC weights, rebuilt when the teacher changes."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
from detectron2.layers import Conv2d, FrozenBatchNorm2d  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_det import build_kd_model, get_kd_cfg  # noqa: E402
from kd_cls.nn.teacher import FrozenTeacher  # noqa: E402
from kd_det.fast import fold_conv_norms, fold_detectron2_norms  # noqa: E402
from kd_det.testing import TINY_OPTS, synthetic_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
R18_REVIEWDKD = os.path.join(REPO, "configs", "detection", "DKD", "ReviewDKD-R18-R101.yaml")
SMALL_TEACHER = ["TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(*opts):
    torch.manual_seed(0)
    cfg = get_kd_cfg(R18_REVIEWDKD, TINY_OPTS + SMALL_TEACHER + list(opts))
    model = build_kd_model(cfg).train()
    _random_frozen_bn(model.teacher)
    return model


@torch.no_grad()
def _random_frozen_bn(module, seed=1):
    """Non-trivial statistics: a fresh FrozenBN is the identity, which folding leaves exact by luck."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _close(a, b, what):
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def test_fold_conv_norms_equals_the_backbone_and_leaves_it_alone():
    model = _build()
    backbone = model.teacher.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    n_norms = sum(type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d) for m in backbone.modules())
    folded = fold_conv_norms(backbone, channels_last=True)
    assert n_norms >= 20 and folded.folded_norms == n_norms  # stem + 16 block convs + 3 shortcuts
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    conv = folded.bottom_up.stem.conv1
    assert conv.bias is not None and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in folded.parameters())
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        ref, out = backbone(x), folded(x)
    assert list(out) == list(ref) == ["p2", "p3", "p4", "p5", "p6"]
    for k in ref:
        _close(out[k], ref[k], k)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(backbone.bottom_up.stem.conv1.norm, FrozenBatchNorm2d)


def test_teacher_copy_is_rebuilt_when_the_teacher_changes():
    model = _build()
    copies = FrozenTeacher(model.teacher, fold_bn=True, channels_last=True, folder=fold_detectron2_norms)
    first = copies.inference_module("backbone")
    assert copies.inference_module("backbone") is first  # nothing changed: the same copy
    x = torch.randn(1, 3, 64, 96)
    _random_frozen_bn(model.teacher, seed=7)  # in-place change, like a checkpoint load
    rebuilt = copies.inference_module("backbone")
    assert rebuilt is not first
    with torch.inference_mode():
        _close(rebuilt(x)["p2"], model.teacher.backbone(x)["p2"], "after an in-place change")
    model.teacher.double()  # a dtype/device move replaces the storages
    moved = copies.inference_module("backbone")
    assert moved is not rebuilt and moved.bottom_up.stem.conv1.weight.dtype == torch.float64
    off = FrozenTeacher(model.teacher, fold_bn=False, channels_last=False)
    assert off.inference_module("backbone") is model.teacher.backbone


def test_rcnnkd_losses_equal_with_and_without_the_copy():
    losses = {}
    for flag in ("True", "False"):
        model = _build("KD.FOLD_TEACHER_BN", flag, "KD.TEACHER_CHANNELS_LAST", flag)
        keys = set(model.state_dict())
        with EventStorage():
            losses[flag] = {k: v.detach() for k, v in model(synthetic_batch()).items()}
        assert set(model.state_dict()) == keys  # the copy is not a submodule
        assert model.frozen_teacher.uses_copy is (flag == "True")
    assert set(losses["True"]) == set(losses["False"]) >= {"loss_reviewkd", "loss_dkd"}
    for k in losses["True"]:
        _close(losses["True"][k], losses["False"][k], k)
    assert losses["True"]["loss_dkd"] > 0
