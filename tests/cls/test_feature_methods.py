"""The feature and relation distillers: training steps, frozen teachers, extra parameters, configs."""
import copy
import math
import os

import pytest
import torch
from torch import nn

from kd_cls.engine import get_cfg
from kd_cls.distillers import build_distiller
from kd_cls.losses import ofd_margins
from kd_cls.models import build_model

METHODS = ["FITNET", "AT", "NST", "PKT", "KDSVD", "OFD", "RKD", "VID", "SP"]

# get_extra_parameters() of mdistiller's distillers, measured by building them with its own
# resnet32x4 (teacher) and resnet8x4 (student).
MDISTILLER_EXTRA_R32X4_R8X4 = {
    "FITNET": 16768,  # ConvReg 128 -> 128 (1x1 conv + bias, BN): 128*128 + 128 + 2*128
    "AT": 0,
    "NST": 0,
    "PKT": 0,
    "KDSVD": 0,
    "OFD": 86912,  # 1x1 conv + BN per stage: 64*64 + 128*128 + 256*256 + 2*(64 + 128 + 256)
    "RKD": 0,
    "VID": 258048,  # regressors only: per stage c_s*c_t + 2*c_t*c_t, c = 64, 128, 256
    "SP": 0,
}
# Heterogeneous pairs that mdistiller supports for each method, with its extra-parameter counts
# (measured the same way). KDSVD needs equal spatial sizes, which no such pair has.
HETERO = {
    "FITNET": ("vgg13", "MobileNetV2", 4864),
    "AT": ("vgg13", "MobileNetV2", 0),
    "NST": ("vgg13", "MobileNetV2", 0),
    "PKT": ("vgg13", "MobileNetV2", 0),
    "OFD": ("resnet32x4", "ShuffleV2", 156800),
    "RKD": ("vgg13", "MobileNetV2", 0),
    "VID": ("vgg13", "MobileNetV2", 1324544),
    "SP": ("vgg13", "MobileNetV2", 0),
}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "cifar100")


@pytest.fixture(scope="module")
def zoo():
    """``zoo(name)``: a fresh copy of a CIFAR-100 zoo model, each architecture initialised once."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(len(cache))
            cache[name] = build_model(name, num_classes=100)
        return copy.deepcopy(cache[name])

    return get


def method_cfg(method, *overrides):
    """Config of ``method``; the teacher runs as registered (the BN-folded copy is tested elsewhere)."""
    cfg = get_cfg()
    cfg.merge_from_list(["DISTILLER.TYPE", method, "SOLVER.FOLD_TEACHER_BN", False, *overrides])
    return cfg


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, snapshot):
    state = model.state_dict()
    assert set(state) == set(snapshot)
    changed = [k for k, v in state.items() if not torch.equal(v, snapshot[k])]
    assert not changed, f"teacher state changed: {changed[:5]}"


def one_step(distiller, batch=3, seed=0):
    """One SGD step on random CIFAR-shaped data; returns the loss dict."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 100, (batch,), generator=gen)
    distiller.train()
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.01, momentum=0.9)
    logits, losses = distiller(image=x, target=y, epoch=1)
    assert logits.shape == (batch, 100)
    assert set(losses) == {"loss_ce", "loss_kd"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    return losses


def check_step_and_frozen_teacher(distiller, teacher_snapshot):
    student_before = state_snapshot(distiller.student)
    losses = one_step(distiller)
    assert losses["loss_kd"].item() > 0
    # the method's own modules are trained
    for module in distiller.extra_modules():
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    student_after = distiller.student.state_dict()
    assert any(not torch.equal(student_after[k], v) for k, v in student_before.items())
    # the teacher: frozen, in eval mode, parameters and BN buffers untouched
    assert not any(m.training for m in distiller.teacher.modules())
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    assert_same_state(distiller.teacher, teacher_snapshot)


@pytest.mark.parametrize("method", METHODS)
def test_step_resnet32x4_to_resnet8x4_frozen_teacher_and_extra_params(method, zoo):
    teacher, student = zoo("resnet32x4"), zoo("resnet8x4")
    before = state_snapshot(teacher)  # also checks that shape probing at build leaves BN stats alone
    d = build_distiller(method_cfg(method), student, teacher)
    assert d.get_extra_parameters() == MDISTILLER_EXTRA_R32X4_R8X4[method]
    log_scales = [p.detach().clone() for p in getattr(d, "log_scales", [])]
    check_step_and_frozen_teacher(d, before)
    # VID's variances are trained here (mdistiller leaves them at their initial value)
    assert all(not torch.equal(a, b) for a, b in zip(log_scales, getattr(d, "log_scales", [])))


@pytest.mark.parametrize("method", sorted(HETERO))
def test_step_heterogeneous_pair(method, zoo):
    t_name, s_name, extra = HETERO[method]
    teacher, student = zoo(t_name), zoo(s_name)
    before = state_snapshot(teacher)
    d = build_distiller(method_cfg(method), student, teacher)
    assert d.get_extra_parameters() == extra
    check_step_and_frozen_teacher(d, before)


def test_kdsvd_heterogeneous_pair_is_a_clear_error(zoo):
    d = build_distiller(method_cfg("KDSVD"), zoo("MobileNetV2"), zoo("vgg13"))
    with pytest.raises(ValueError, match=r"stage \d student width \d+ != teacher width \d+"):
        one_step(d, batch=2)


@pytest.mark.parametrize("method", METHODS)
def test_overfits_a_tiny_batch(method, zoo):
    torch.manual_seed(1)
    d = build_distiller(method_cfg(method), build_model("resnet8", num_classes=100), zoo("resnet8"))
    d.train()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 100, (6,), generator=gen)
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(6):
        _, losses = d(image=x, target=y, epoch=1)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert all(math.isfinite(v) for v in totals)
    assert totals[-1] < 0.97 * totals[0], totals


# ------------------------------------------------------------------ method specifics
def test_ofd_margins_come_from_the_registered_teacher(zoo):
    teacher = zoo("resnet32x4")
    d = build_distiller(method_cfg("OFD", "SOLVER.FOLD_TEACHER_BN", True), zoo("resnet8x4"), teacher)
    d.run_teacher(torch.randn(1, 3, 32, 32), d.t_taps)  # builds and runs the BN-folded inference copy
    bn = teacher.get_bn_before_relu()[-1]
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.fill_(0.0)
    # N(0, 1): the mean of the negative part is -sqrt(2/pi)
    assert torch.allclose(d.margins()[-1], torch.full((256,), -math.sqrt(2 / math.pi)), atol=1e-6)
    first = teacher.get_bn_before_relu()[0]
    assert torch.equal(d.margins()[0], ofd_margins(first.weight, first.bias))
    # OFD keeps the teacher in eval mode (mdistiller switches it to train mode)
    d.train()
    assert not teacher.training and not bn.training


def test_vid_variances_are_registered_and_reported(zoo):
    d = build_distiller(method_cfg("VID"), zoo("resnet8x4"), zoo("resnet32x4"))
    assert [p.numel() for p in d.log_scales] == [64, 128, 256]
    var = torch.nn.functional.softplus(d.log_scales[0]) + 1e-5
    assert torch.allclose(var, torch.full_like(var, 5.0))  # VID.INIT_PRED_VAR
    ids = {id(p) for p in d.get_learnable_parameters()}
    assert all(id(p) in ids for p in d.log_scales)
    assert "log_scales.2" in d.state_dict()
    (note,) = d.extra_parameter_notes()
    assert "448" in note and "VID" in note


def test_bad_hint_layer_and_tapless_models_fail_in_one_line(zoo):
    with pytest.raises(ValueError, match=r"FITNET.HINT_LAYER 7 is out of range; valid: 0..3") as e:
        build_distiller(method_cfg("FITNET", "FITNET.HINT_LAYER", 7), zoo("resnet8x4"), zoo("resnet32x4"))
    assert "\n" not in str(e.value)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(100))
    with pytest.raises(TypeError, match="declares no tap points"):
        build_distiller(method_cfg("AT"), plain, zoo("resnet32x4"))


def test_method_defaults_equal_mdistillers():
    cfg = get_cfg()
    assert cfg.FITNET.HINT_LAYER == 2 and tuple(cfg.FITNET.INPUT_SIZE) == (32, 32)
    assert (cfg.FITNET.LOSS.CE_WEIGHT, cfg.FITNET.LOSS.FEAT_WEIGHT) == (1.0, 100.0)
    assert cfg.AT.P == 2 and cfg.AT.LOSS.FEAT_WEIGHT == 1000.0
    assert cfg.NST.LOSS.FEAT_WEIGHT == 50.0 and cfg.PKT.LOSS.FEAT_WEIGHT == 30000.0
    assert cfg.KDSVD.K == 1 and cfg.KDSVD.LOSS.FEAT_WEIGHT == 1.0
    assert cfg.OFD.LOSS.FEAT_WEIGHT == 0.001 and cfg.OFD.CONNECTOR.KERNEL_SIZE == 1
    assert (cfg.RKD.DISTANCE_WEIGHT, cfg.RKD.ANGLE_WEIGHT) == (25, 50)
    assert cfg.RKD.PDIST.EPSILON == 1e-12 and cfg.RKD.PDIST.SQUARED is False
    assert (cfg.VID.EPS, cfg.VID.INIT_PRED_VAR, tuple(cfg.VID.INPUT_SIZE)) == (1e-5, 5.0, (32, 32))
    assert cfg.SP.LOSS.FEAT_WEIGHT == 3000.0
    for m in METHODS:
        assert cfg[m].LOSS.CE_WEIGHT == 1.0


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("method", METHODS)
def test_config_loads_and_builds(method, zoo):
    name = method.lower()
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    assert cfg.DISTILLER.TYPE == method
    assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("resnet32x4", "resnet8x4")
    assert cfg.EXPERIMENT.TAG == f"{name},res32x4,res8x4" and cfg.EXPERIMENT.PROJECT == "cifar100_baselines"
    assert cfg.SOLVER.WEIGHT_DECAY == 0.0005 and cfg.SOLVER.LR == 0.05 and cfg.SOLVER.BATCH_SIZE == 64
    d = build_distiller(cfg, zoo(cfg.DISTILLER.STUDENT), zoo(cfg.DISTILLER.TEACHER), num_data=50000)
    assert type(d).method_name == method


def test_vid_config_trains_two_steps_on_digits(tmp_path, capsys):
    from kd_cls.checkpoint_io import atomic_save as save_checkpoint
    from kd_cls.engine.launch import build_run

    teacher_path = str(tmp_path / "teacher.pth")
    save_checkpoint({"model": build_model("resnet32x4", num_classes=10, dataset="digits").state_dict()}, teacher_path)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "vid.yaml"))
    cfg.merge_from_list(
        ["DATASET.TYPE", "digits", "DATASET.SUBSET", 6, "SOLVER.BATCH_SIZE", 3, "DATASET.TEST.BATCH_SIZE", 6,
         "DISTILLER.TEACHER_WEIGHTS", teacher_path, "LOG.PREFIX", str(tmp_path / "out"), "LOG.EVAL_TEACHER", False,
         "SOLVER.FOLD_TEACHER_BN", False]
    )
    trainer = build_run(cfg)
    out = capsys.readouterr().out
    assert "extra parameters of VID: 258048" in out and "VID variances: 448" in out
    d = trainer.distiller
    teacher_before = state_snapshot(d.teacher)
    scales_before = [p.detach().clone() for p in d.log_scales]
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    losses = [trainer.train_step(batch, epoch=1)["loss"].item() for _ in range(2)]
    assert all(math.isfinite(v) for v in losses)
    assert_same_state(d.teacher, teacher_before)
    assert all(not torch.equal(a, b) for a, b in zip(scales_before, d.log_scales))
