"""RCNNKD: hooks, frozen teacher, one box-head pass, teacher preprocessing, weights and errors."""
import os
import pickle

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_cls.config import ConfigError  # noqa: E402
from kd_cls.losses import dkd_loss  # noqa: E402
from kd_det import KDCheckpointer, TeacherNotLoadedError, build_kd_model, export_student, get_kd_cfg  # noqa: E402
from kd_det.testing import TINY_OPTS, synthetic_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
R18_REVIEWDKD = os.path.join(REPO, "configs", "detection", "DKD", "ReviewDKD-R18-R101.yaml")
# An R-18 teacher keeps these tests fast; the R-101 teachers run in test_det_train.py.
SMALL_TEACHER = ["TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*opts, path=R18_REVIEWDKD):
    return get_kd_cfg(path, TINY_OPTS + SMALL_TEACHER + list(opts))


def _build(*opts, path=R18_REVIEWDKD):
    torch.manual_seed(0)
    return build_kd_model(_cfg(*opts, path=path))


@pytest.fixture(scope="module")
def model():
    return _build().train()


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, i, o: calls.append(torch.is_inference_mode_enabled()))
    return calls, handle


def test_layout_matches_mdistiller(model):
    tops = {k.split(".")[0] for k in model.state_dict()}
    assert tops == {"backbone", "proposal_generator", "roi_heads", "teacher", "kd_trans"}
    # ReviewKD's fusion modules: abfs[0] (coarsest level) has no attention conv, the others do.
    names = {k for k in model.state_dict() if k.startswith("kd_trans.")}
    assert "kd_trans.abfs.0.conv1.0.weight" in names and "kd_trans.abfs.0.att_conv.0.weight" not in names
    assert "kd_trans.abfs.4.att_conv.0.weight" in names


def test_losses_and_single_passes(model):
    counters = {
        "student_box_head": _count_calls(model.roi_heads.box_head),
        "teacher_box_head": _count_calls(model.teacher.roi_heads.box_head),
        "student_backbone": _count_calls(model.backbone),
        "teacher_backbone": _count_calls(model.teacher.backbone),
    }
    try:
        with EventStorage():
            losses = model(synthetic_batch())
    finally:
        for _, h in counters.values():
            h.remove()
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_reviewkd", "loss_dkd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # Each network part runs exactly once per step; the teacher's under inference mode only.
    assert counters["student_box_head"][0] == [False]
    assert counters["student_backbone"][0] == [False]
    assert counters["teacher_box_head"][0] == [True]
    assert counters["teacher_backbone"][0] == [True]


def test_captured_fpn_features_equal_backbone_outputs(model, monkeypatch):
    seen = {}
    orig = type(model.kd_trans).forward

    def spy(self, inputs):
        seen["inputs"] = inputs
        return orig(self, inputs)

    monkeypatch.setattr(type(model.kd_trans), "forward", spy)
    batch = synthetic_batch()
    with EventStorage():
        model(batch)
    inputs = seen["inputs"]
    with torch.no_grad():  # FrozenBN: the backbones are deterministic
        s_ref = model.backbone(model.preprocess_image(batch).tensor)
        t_ref = model.teacher.backbone(model.preprocess_teacher_image(batch).tensor)
    assert list(inputs.student_fpn) == ["p2", "p3", "p4", "p5", "p6"]
    for k in s_ref:
        torch.testing.assert_close(inputs.student_fpn[k].detach(), s_ref[k])
        # The teacher ran from its inference copy (BNs folded, NHWC): equal within float rounding.
        scale = float(t_ref[k].abs().max())
        torch.testing.assert_close(inputs.teacher_fpn[k], t_ref[k], rtol=1e-4, atol=1e-5 * scale)
    assert inputs.student_fpn["p2"].requires_grad
    assert not inputs.teacher_fpn["p2"].requires_grad
    # Logits: one row per sampled proposal of the batch, K + 1 columns.
    assert inputs.student_roi_logits.shape == inputs.teacher_roi_logits.shape == (inputs.roi_gt_classes.numel(), 81)


def test_teacher_frozen_after_a_step():
    from detectron2.solver import build_optimizer

    model = _build().train()
    cfg = _cfg()
    opt = build_optimizer(cfg, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.teacher.parameters())
    assert all(id(p) in in_opt for p in model.kd_trans.parameters())
    before_t = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    before_s = model.backbone.fpn_output2.weight.detach().clone()
    with EventStorage():
        losses = model(synthetic_batch())
    sum(losses.values()).backward()
    opt.step()
    assert model.teacher.training is False
    assert all(p.grad is None for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before_t[k]), k
    assert not torch.equal(model.backbone.fpn_output2.weight, before_s)


def test_teacher_image_flipped_then_normalised():
    model = _build("TEACHER.MODEL.PIXEL_MEAN", "[10.0, 20.0, 30.0]", "TEACHER.MODEL.PIXEL_STD", "[2.0, 4.0, 5.0]")
    assert model.input_format == "RGB" and model.teacher_input_format == "BGR"
    img = torch.zeros(3, 64, 64)
    img[0], img[1], img[2] = 100.0, 60.0, 40.0  # R, G, B
    x = model.preprocess_teacher_image([{"image": img}]).tensor[0, :, 0, 0]
    # BGR order: (B - 10) / 2, (G - 20) / 4, (R - 30) / 5
    torch.testing.assert_close(x, torch.tensor([15.0, 10.0, 14.0]))


def test_dkd_is_zero_for_an_identical_teacher():
    same = [
        "TEACHER.INPUT.FORMAT", "RGB",
        "TEACHER.MODEL.PIXEL_STD", "[57.375, 57.120, 58.395]",
        "KD.TYPE", "DKD",
    ]
    model = _build(*same).train()
    student = model.student_state_dict()
    model.teacher.load_state_dict(student)
    with EventStorage():
        losses = model(synthetic_batch())
    assert losses["loss_dkd"].item() == pytest.approx(0.0, abs=1e-5)
    assert "loss_reviewkd" not in losses
    # A different teacher gives a positive loss, equal to dkd_loss on the same logits.
    seen = {}
    orig = type(model.kd_dkd).forward
    with torch.no_grad():
        for p in model.teacher.roi_heads.box_predictor.parameters():
            p.add_(torch.randn_like(p))
    type(model.kd_dkd).forward = lambda self, inputs: seen.setdefault("x", inputs) and orig(self, inputs)
    try:
        with EventStorage():
            losses = model(synthetic_batch())
    finally:
        type(model.kd_dkd).forward = orig
    i = seen["x"]
    expected = dkd_loss(i.student_roi_logits, i.teacher_roi_logits, i.roi_gt_classes, 1.0, 0.25, 1.0)
    assert losses["loss_dkd"].item() == pytest.approx(expected.item()) and expected.item() > 1e-3


def test_random_teacher_is_refused(model):
    combined = model.state_dict()
    model = _build("KD.ALLOW_RANDOM_TEACHER", "False").train()
    with pytest.raises(TeacherNotLoadedError, match="TEACHER.MODEL.WEIGHTS"):
        model(synthetic_batch())
    # A combined teacher+student state dict (mdistiller's layout) loads the teacher.
    model.load_state_dict(combined)
    assert model.missing_teacher_keys() == []
    with EventStorage():
        model(synthetic_batch())


@pytest.mark.parametrize("fmt", ["pth", "pkl"])
def test_teacher_weights_file(tmp_path, fmt, model):
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in model.teacher.state_dict().items()}
    path = str(tmp_path / f"teacher.{fmt}")
    if fmt == "pth":
        torch.save({"model": state}, path)
    else:  # detectron2 model-zoo layout: numpy arrays + an author tag
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    model = _build("KD.ALLOW_RANDOM_TEACHER", "False", "TEACHER.MODEL.WEIGHTS", path)
    assert model.missing_teacher_keys() == []
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, state[k])
    with pytest.raises(FileNotFoundError, match="TEACHER.MODEL.WEIGHTS file not found"):
        _build("KD.ALLOW_RANDOM_TEACHER", "False", "TEACHER.MODEL.WEIGHTS", str(tmp_path / "absent.pth"))


def test_student_only_pkl_does_not_touch_teacher(tmp_path, model):
    student = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in model.student_state_dict().items()}
    model = _build()
    path = str(tmp_path / "student.pkl")
    # detectron2 matches the names of an authored .pkl by suffix, which would also hit "teacher.*".
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in student.items()}, "__author__": "t"}, f)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    KDCheckpointer(model).load(path)
    assert all(torch.equal(v, before[k]) for k, v in model.teacher.state_dict().items())
    torch.testing.assert_close(model.backbone.fpn_output2.weight, student["backbone.fpn_output2.weight"])
    assert model.missing_teacher_keys()  # still not loaded


def test_student_export_loads_into_plain_rcnn(tmp_path, model):
    path = export_student(model, str(tmp_path / "student.pth"))
    plain = build_kd_model(_cfg("MODEL.META_ARCHITECTURE", "GeneralizedRCNN"))
    assert type(plain).__name__ == "GeneralizedRCNN"
    plain.load_state_dict(torch.load(path)["model"], strict=True)
    model.eval()
    plain.eval()
    batch = synthetic_batch(1)
    with torch.no_grad():
        a = model(batch)[0]["instances"]
        b = plain(batch)[0]["instances"]
    model.train()
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    torch.testing.assert_close(a.scores, b.scores)


def test_different_fpn_widths_are_bridged_by_abf():
    model = _build("TEACHER.MODEL.FPN.OUT_CHANNELS", "128").train()
    assert model.kd_trans.abfs[0].conv2[0].out_channels == 128
    with EventStorage():
        losses = model(synthetic_batch())
    assert torch.isfinite(losses["loss_reviewkd"])


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone_kdd"], "unknown MODEL.BACKBONE.NAME.*Valid choices:.*build_mobilenetv2_fpn_backbone"),
        (["TEACHER.MODEL.BACKBONE.NAME", "nope"], "unknown TEACHER.MODEL.BACKBONE.NAME 'nope'"),
        (["KD.REVIEWKD.OUT_CHANNELS", "[128, 128, 128, 128, 128]"], "FPN channel mismatch.*OUT_CHANNELS.*256"),
        (["KD.REVIEWKD.IN_CHANNELS", "[64, 64, 64, 64, 64]"], "FPN channel mismatch.*IN_CHANNELS"),
        (["MODEL.RESNETS.RES2_OUT_CHANNELS", "256"], "RES2_OUT_CHANNELS 64"),
    ],
)
def test_clear_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        _build(*opts)


def test_levels_pair_by_stride():
    """A teacher FPN without p2 (strides 8-64) pairs with the student's p3-p6; p2 is left out."""
    model = _build(
        "TEACHER.MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
        "TEACHER.MODEL.RPN.IN_FEATURES", "['p3', 'p4', 'p5', 'p6']",
        "TEACHER.MODEL.ROI_HEADS.IN_FEATURES", "['p3', 'p4', 'p5']",
        "TEACHER.MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256]]",
    ).train()
    assert [p[:3] for p in model.pair.fpn_pairs] == [(8, "p3", "p3"), (16, "p4", "p4"), (32, "p5", "p5"),
                                                     (64, "p6", "p6")]
    assert model.kd_trans.levels == ["p3", "p4", "p5", "p6"] and len(model.kd_trans.abfs) == 4
    with EventStorage():
        losses = model(synthetic_batch())
    assert torch.isfinite(losses["loss_reviewkd"]) and losses["loss_reviewkd"] > 0


def test_mobilenetv2_fpn_shapes():
    from detectron2.modeling import build_backbone

    cfg = get_kd_cfg(
        os.path.join(REPO, "configs", "detection", "COCO-Detection", "faster_rcnn_MV2_FPN_3x.yaml"),
        ["MODEL.BACKBONE.FREEZE_AT", "2"],
    )
    bb = build_backbone(cfg)
    shapes = bb.bottom_up.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "m2": (24, 4), "m3": (32, 8), "m4": (96, 16), "m5": (320, 32)
    }
    out = bb(torch.zeros(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 256, 16, 16), "p3": (1, 256, 8, 8), "p4": (1, 256, 4, 4), "p5": (1, 256, 2, 2), "p6": (1, 256, 1, 1)
    }
    feats = bb.bottom_up.features
    # FREEZE_AT 2: the stem and the blocks up to m2 (layers 0-3) are frozen, the rest train.
    assert not any(p.requires_grad for i in range(4) for p in feats[i].parameters())
    assert all(p.requires_grad for p in feats[4].parameters())
