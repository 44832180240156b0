"""DetectionDistiller over any detectron2 detector: the family matrix, the config contract, methods as a
list, KD.IMPORTS, KD.INHERIT, the teacher-weight rule, the student export and the one-line errors."""
import os
import textwrap

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_cls.config import ConfigError  # noqa: E402
from kd_det import DetectionDistiller, TeacherNotLoadedError, build_kd_model, export_student, get_kd_cfg  # noqa: E402
from kd_det.pairing import DetectorPair  # noqa: E402
from kd_det.testing import FAMILY_CONFIGS, TINY_OPTS, stub_detector, synthetic_batch  # noqa: E402
from kd_det.testing import write_kd_config as _write_kd_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET = os.path.join(REPO, "configs", "detection")
FAMILY_CFG = {f: os.path.join(DET, path) for f, path in FAMILY_CONFIGS.items()}
STUDENT_LOSSES = {
    "rcnn": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"},
    "retinanet": {"loss_cls", "loss_box_reg"},
    "fcos": {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_kd_config(tmp_path, student: str, teacher: str, methods, extra: str = "") -> str:
    """A config made only of _BASE_, TEACHER.CONFIG_FILE and KD.METHODS (plus ``extra`` lines under KD)."""
    return _write_kd_config(tmp_path, DET, student, teacher, methods, extra)


def build(tmp_path, student, teacher, methods=("ReviewKD",), *opts, extra=""):
    torch.manual_seed(0)
    cfg = get_kd_cfg(write_kd_config(tmp_path, student, teacher, methods, extra), TINY_OPTS + list(opts))
    return build_kd_model(cfg)


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("teacher, student", [
    ("retinanet", "retinanet"), ("fcos", "fcos"), ("rcnn", "retinanet"), ("rcnn", "fcos"), ("retinanet", "rcnn"),
])
def test_pair_trains_one_step(tmp_path, teacher, student):
    model = build(tmp_path, student, teacher).train()
    assert isinstance(model, DetectionDistiller) and model.pair.student_family == student
    assert model.pair.teacher_family == teacher
    with EventStorage():
        losses = model(synthetic_batch())
    assert STUDENT_LOSSES[student] <= set(losses) and "loss_reviewkd" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_reviewkd"] > 0
    # The KD loss alone reaches the student's FPN (what ReviewKD distills), never the teacher.
    losses["loss_reviewkd"].backward()
    fpn = [m for n, m in model.student.backbone.named_children() if n.startswith("fpn_output")]
    assert fpn and sum(_grad_norm(m) for m in fpn) > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    # Strides pair whatever the level names: R-CNN p2-p6 and RetinaNet/FCOS p3-p7 share p3-p6.
    strides = [p[0] for p in model.pair.fpn_pairs]
    assert strides == ([4, 8, 16, 32, 64] if teacher == student == "rcnn" else
                       [8, 16, 32, 64, 128] if "rcnn" not in (teacher, student) else [8, 16, 32, 64])


def test_inference_and_export_are_the_student_alone(tmp_path):
    model = build(tmp_path, "retinanet", "retinanet").eval()
    batch = synthetic_batch(1)
    with torch.no_grad():
        a = model(batch)[0]["instances"]
        b = model.student(batch)[0]["instances"]
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    # model_final's layout: the student's keys at the top level, exactly the plain detector's.
    plain = build_kd_model(get_kd_cfg(FAMILY_CFG["retinanet"], TINY_OPTS))
    assert type(plain).__name__ == "RetinaNet"
    own = {k for k in model.state_dict() if not k.startswith(("teacher.", "kd_trans."))}
    assert own == set(plain.state_dict())
    path = export_student(model, str(tmp_path / "student.pth"))
    plain.load_state_dict(torch.load(path)["model"], strict=True)
    plain.eval()
    with torch.no_grad():
        c = plain(batch)[0]["instances"]
    torch.testing.assert_close(c.scores, a.scores)


def test_dkd_reaches_the_student_box_predictor(tmp_path):
    model = build(tmp_path, "rcnn", "rcnn", ("DKD",)).train()
    with EventStorage():
        losses = model(synthetic_batch())
    assert losses["loss_dkd"] > 0
    losses["loss_dkd"].backward()
    assert _grad_norm(model.student.roi_heads.box_predictor.cls_score) > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_method_list_equals_mdistiller_kd_type(tmp_path):
    small = TINY_OPTS + ["TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    torch.manual_seed(0)
    old = build_kd_model(get_kd_cfg(os.path.join(DET, "DKD", "ReviewDKD-R18-R101.yaml"), small)).train()
    # The same student, teacher and weights, written with KD.METHODS instead of RCNNKD + KD.TYPE.
    new_file = tmp_path / "review-dkd.yaml"
    new_file.write_text(textwrap.dedent(f"""\
        _BASE_: "{os.path.join(DET, 'Base-Distillation.yaml')}"
        INPUT:
          FORMAT: "RGB"
        MODEL:
          META_ARCHITECTURE: "GeneralizedRCNN"
          PIXEL_STD: [57.375, 57.120, 58.395]
          RESNETS:
            DEPTH: 18
            RES2_OUT_CHANNELS: 64
        KD:
          METHODS: ["ReviewKD", "DKD"]
          REVIEWKD:
            LOSS_WEIGHT: 1.2
        """))
    new = build_kd_model(get_kd_cfg(str(new_file), small)).train()
    assert type(old).__name__ == "RCNNKD" and type(new) is DetectionDistiller
    assert set(old.state_dict()) == set(new.state_dict())
    new.load_state_dict(old.state_dict())
    losses = []
    for model in (old, new):
        torch.manual_seed(1)  # the RPN and RoI sampling draw random numbers
        with EventStorage():
            losses.append({k: v.detach() for k, v in model(synthetic_batch()).items()})
    assert set(losses[0]) == set(losses[1]) >= {"loss_reviewkd", "loss_dkd"}
    for k in losses[0]:
        torch.testing.assert_close(losses[0][k], losses[1][k], msg=k)


def test_user_method_from_kd_imports(tmp_path):
    (tmp_path / "my_kd_methods.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from detectron2.config import CfgNode as CN
        from torch import nn

        from kd_det.methods.base import FPN, KDMethod, register_kd_method


        @register_kd_method("MyL2")
        class MyL2(KDMethod):
            NEEDS = (FPN,)

            def __init__(self, pairs, weight):
                super().__init__()
                self.pairs, self.weight = pairs, weight
                self.align = nn.ModuleList(nn.Conv2d(cs, ct, 1) for _, _, _, cs, ct in pairs)

            @staticmethod
            def add_config(cfg):
                cfg.KD.MYL2 = CN()
                cfg.KD.MYL2.LOSS_WEIGHT = 1.0

            @classmethod
            def from_config(cls, cfg, pair):
                return cls(pair.require_fpn_pairs("MyL2"), cfg.KD.MYL2.LOSS_WEIGHT)

            def forward(self, inputs):
                loss = sum(F.mse_loss(a(inputs.student_fpn[s]), inputs.teacher_fpn[t])
                           for a, (_, s, t, _, _) in zip(self.align, self.pairs))
                return {"loss_myl2": self.weight * loss}
    '''))
    extra = f'  IMPORTS: ["{tmp_path / "my_kd_methods.py"}"]\n  MYL2:\n    LOSS_WEIGHT: 2.0\n'
    model = build(tmp_path, "fcos", "fcos", ("MyL2",), extra=extra).train()
    assert model.kd_myl2.weight == 2.0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    values = []
    for _ in range(2):
        with EventStorage():
            losses = model(synthetic_batch())
        values.append(float(losses["loss_myl2"]))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(torch.isfinite(torch.tensor(values))) and values[0] > 0


def test_inherit_neck_and_head(tmp_path):
    model = build(tmp_path, "retinanet", "retinanet", ("ReviewKD",), "KD.INHERIT", "['neck', 'head']")
    s, t = model.student.state_dict(), model.teacher.state_dict()
    inherited = [k for k in s if k.startswith(("backbone.fpn", "backbone.top_block", "head."))]
    assert inherited and all(torch.equal(s[k], t[k]) for k in inherited)
    bottom_up = [k for k in s if k.startswith("backbone.bottom_up.") and s[k].is_floating_point() and s[k].numel() > 64]
    assert not all(torch.equal(s[k], t[k]) for k in bottom_up)


def test_teacher_weights_only_from_teacher_model_weights(tmp_path):
    # The teacher recipe's MODEL.WEIGHTS (its ImageNet init) is never loaded: no file is needed.
    teacher_file = tmp_path / "teacher.yaml"
    teacher_file.write_text(f'_BASE_: "{FAMILY_CFG["retinanet"]}"\nMODEL:\n  WEIGHTS: "absent/imagenet.pkl"\n')
    cfg = get_kd_cfg(write_kd_config(tmp_path, "retinanet", "retinanet", ["ReviewKD"]),
                     TINY_OPTS + ["TEACHER.CONFIG_FILE", str(teacher_file), "KD.ALLOW_RANDOM_TEACHER", "False"])
    model = build_kd_model(cfg).train()
    assert model.missing_teacher_keys()
    with pytest.raises(TeacherNotLoadedError, match="TEACHER.MODEL.WEIGHTS"):
        model(synthetic_batch())
    # With KD.ALLOW_RANDOM_TEACHER nothing is loaded, not even TEACHER.MODEL.WEIGHTS.
    model = build(tmp_path, "retinanet", "retinanet", ("ReviewKD",), "TEACHER.MODEL.WEIGHTS", "absent/teacher.pth")
    assert model.missing_teacher_keys()


def test_teacher_config_from_the_model_zoo(tmp_path):
    from kd_det.teacher_cfg import resolve_teacher_config_file

    try:
        path = resolve_teacher_config_file("COCO-Detection/retinanet_R_50_FPN_3x.yaml")
    except FileNotFoundError:
        pytest.skip("detectron2's model-zoo configs are not installed (tools/install_detectron2.sh copies them)")
    assert os.path.isfile(path) and path.endswith("retinanet_R_50_FPN_3x.yaml")
    # An existing file of that name wins over the zoo.
    own = tmp_path / "COCO-Detection" / "retinanet_R_50_FPN_3x.yaml"
    own.parent.mkdir()
    own.write_text(f'_BASE_: "{FAMILY_CFG["retinanet"]}"\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve_teacher_config_file("COCO-Detection/retinanet_R_50_FPN_3x.yaml") == str(own)
    finally:
        os.chdir(cwd)


def test_example_configs_build(tmp_path):
    for name, (s_fam, t_fam) in {"ReviewKD-RetinaNet-R18-R101.yaml": ("retinanet", "retinanet"),
                                 "ReviewKD-FCOS-R18-FasterRCNN-R50.yaml": ("fcos", "rcnn")}.items():
        cfg = get_kd_cfg(os.path.join(DET, "ReviewKD", name), TINY_OPTS + ["TEACHER.MODEL.WEIGHTS", ""])
        model = build_kd_model(cfg)
        assert (model.pair.student_family, model.pair.teacher_family) == (s_fam, t_fam), name


def test_no_common_level_is_one_line():
    pair = DetectorPair.build(stub_detector([4, 8]), stub_detector([16, 32]))
    with pytest.raises(ConfigError) as e:
        pair.require_fpn_pairs("ReviewKD")
    msg = str(e.value)
    assert "\n" not in msg and "p2 (stride 4)" in msg and "p4 (stride 16)" in msg


@pytest.mark.parametrize("student, teacher, methods, opts, match", [
    ("retinanet", "retinanet", ["ReviewKd"], [], "unknown KD method 'ReviewKd'. Did you mean 'ReviewKD'"),
    ("retinanet", "retinanet", ["DKD"], [], "DKD does not serve a retinanet student"),
    ("retinanet", "rcnn", ["ReviewKD"], ["KD.INHERIT", "['head']"], "KD.INHERIT.*needs one family"),
    ("retinanet", "retinanet", ["ReviewKD"], ["KD.INHERIT", "['neck']", "TEACHER.MODEL.RESNETS.DEPTH", "50",
                                              "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "256"],
     r"KD.INHERIT neck: student keys that do not match.*backbone.fpn_lateral3.weight"),
    ("retinanet", "retinanet", ["ReviewKD"], ["KD.INHERIT", "['nek']"], "unknown KD.INHERIT part 'nek'"),
    ("retinanet", "retinanet", ["ReviewKD"], ["KD.TYPE", "ReviewKD"], "KD.TYPE.*and KD.METHODS.*are both set"),
])
def test_bad_input_is_one_line(tmp_path, student, teacher, methods, opts, match):
    with pytest.raises(ConfigError, match=match) as e:
        build(tmp_path, student, teacher, methods, *opts)
    assert "\n" not in str(e.value)


def test_rcnnkd_with_kd_methods_is_refused():
    path = os.path.join(DET, "DKD", "DKD-R18-R101.yaml")
    with pytest.raises(ConfigError, match="RCNNKD takes its methods from KD.TYPE"):
        get_kd_cfg(path, TINY_OPTS + ["KD.METHODS", "['ReviewKD']"])


def test_empty_methods_is_plain_training(tmp_path):
    model = build(tmp_path, "fcos", "retinanet", ())
    assert type(model).__name__ == "FCOS"
