"""FitNet, PKD and CWD on FPN levels (and CWD on dense class logits): every family as student, same- and
cross-family teachers, a Mask R-CNN student, the official defaults, the loss values on the real model
path, the example configs and the one-line errors."""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
import kd_det.distiller  # noqa: E402
from detectron2.structures import BitMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_cls.config import ConfigError  # noqa: E402
from kd_cls.losses import cwd_loss, pkd_loss  # noqa: E402
from kd_det import DetectionDistiller, build_kd_model, get_kd_cfg  # noqa: E402
from kd_det.defaults import d2_defaults  # noqa: E402
from kd_det.inputs import KDInputs  # noqa: E402
from kd_det.methods.cwd import CWDFPN  # noqa: E402
from kd_det.methods.fitnet import fpn_connectors  # noqa: E402
from kd_det.methods.pkd import PKDFPN, select_levels  # noqa: E402
from kd_det.pairing import DetectorPair  # noqa: E402
from kd_det.testing import FAMILY_CONFIGS, TINY_OPTS, stub_detector, synthetic_batch, write_kd_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET = os.path.join(REPO, "configs", "detection")
CFG = {f: os.path.join(DET, path) for f, path in FAMILY_CONFIGS.items()}
METHODS = ["FitNet", "PKD", "CWD"]
# PKD's LOSS_WEIGHT by the teacher's family, open-mmlab/mmrazor 90c7af1, configs/distill/mmdet/pkd/:
# R-CNN teacher 6 (pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py, and
# pkd_fpn_mask-rcnn_swin_retina_r50_2x_coco.py with a RetinaNet student); RetinaNet / FCOS teacher 10
# (pkd_fpn_retina_x101_retina_r50_2x_coco.py, pkd_fpn_fcos_x101_retina_r50_1x_coco.py).
PKD_WEIGHT = {"rcnn": 6.0, "retinanet": 10.0, "fcos": 10.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_config(tmp_path, student, teacher, methods, extra=""):
    return write_kd_config(tmp_path, DET, student, teacher, methods, extra)


def build(tmp_path, student, teacher, methods=METHODS, *opts):
    torch.manual_seed(0)
    return build_kd_model(get_kd_cfg(write_config(tmp_path, student, teacher, methods), TINY_OPTS + list(opts)))


# Detector pairs built by the training test, reused by the config-error tests (building dominates the runtime).
_PAIRS = {}


def pair_of(tmp_path, student, teacher):
    if (student, teacher) not in _PAIRS:
        _PAIRS[student, teacher] = build(tmp_path, student, teacher).pair
    return _PAIRS[student, teacher]


def cfg_with(*opts):
    cfg = d2_defaults()
    cfg.merge_from_list(list(opts))
    return cfg


def with_masks(batch):
    for x in batch:
        inst = x["instances"]
        h, w = inst.image_size
        masks = torch.zeros(len(inst), h, w, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, inst.gt_boxes.tensor.round().long().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
    return batch


def run_step(model, monkeypatch, batch=None):
    """One training forward; returns the losses and the KDInputs the methods read."""
    seen = {}

    class Recording(KDInputs):
        def __init__(self, *args):
            super().__init__(*args)
            seen["inputs"] = self

    monkeypatch.setattr(kd_det.distiller, "KDInputs", Recording)
    with EventStorage():
        losses = model(batch if batch is not None else synthetic_batch())
    return losses, seen["inputs"]


def fpn_params(model):
    return [p for n, p in model.student.backbone.named_parameters() if n.startswith(("fpn_output", "fpn_lateral"))]


def grad_norm(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


# student, teacher: every student family from a same-family and a different-family teacher, and Mask R-CNN.
PAIRS = [("rcnn", "rcnn"), ("rcnn", "retinanet"), ("retinanet", "retinanet"), ("retinanet", "fcos"),
         ("fcos", "fcos"), ("fcos", "rcnn"), ("mask_rcnn", "rcnn")]


@pytest.mark.parametrize("student, teacher", PAIRS)
def test_methods_train_and_equal_the_kd_cls_losses(tmp_path, monkeypatch, student, teacher):
    logits = student == teacher and student in ("retinanet", "fcos")  # same anchors x classes: CWD on logits too
    opts = ["KD.CWD.LOGITS_WEIGHT", "5.0"] if logits else []
    model = build(tmp_path, student, teacher, METHODS, *opts).train()
    assert isinstance(model, DetectionDistiller)
    _PAIRS[student, teacher] = model.pair
    t_family = "rcnn" if teacher == "mask_rcnn" else teacher
    assert model.kd_pkd.loss_weight == PKD_WEIGHT[t_family]
    batch = with_masks(synthetic_batch()) if student == "mask_rcnn" else None
    losses, inputs = run_step(model, monkeypatch, batch)
    if student == "mask_rcnn":
        assert "loss_mask" in losses
    kd_keys = {"loss_fitnet", "loss_pkd", "loss_cwd"} | ({"loss_cwd_logits"} if logits else set())
    assert kd_keys == {k for k in losses if k.startswith(("loss_fitnet", "loss_pkd", "loss_cwd"))}
    for k in kd_keys:
        assert torch.isfinite(losses[k]) and losses[k] > 0, k

    # Each KD loss alone reaches the student's FPN; FitNet's also its connectors, CWD's logits the class conv.
    fpn = fpn_params(model)
    for k in kd_keys - {"loss_cwd_logits"}:
        assert grad_norm(losses[k], fpn) > 0, k
    assert grad_norm(losses["loss_fitnet"], list(model.kd_fitnet.connectors.parameters())) > 0
    if logits:
        assert grad_norm(losses["loss_cwd_logits"], list(model.student.head.cls_score.parameters())) > 0
    sum(losses[k] for k in kd_keys).backward()
    assert all(p.grad is None for p in model.teacher.parameters())

    # The values equal the kd_cls losses called by hand on the captured features, over the stride-paired levels.
    pairs = inputs.fpn_pairs
    assert [p[0] for p in pairs] == ([4, 8, 16, 32, 64] if {student, teacher} <= {"rcnn", "mask_rcnn"} else
                                     [8, 16, 32, 64] if "rcnn" in (student, teacher) or student == "mask_rcnn"
                                     else [8, 16, 32, 64, 128])
    s_fpn, t_fpn = inputs.student_fpn, inputs.teacher_fpn
    with torch.no_grad():
        fitnet = sum(F.mse_loss(c(s_fpn[s]), t_fpn[t]) for c, (_, s, t, _, _) in zip(model.kd_fitnet.connectors, pairs))
        pkd = PKD_WEIGHT[t_family] * sum(pkd_loss(s_fpn[s], t_fpn[t]) for _, s, t, _, _ in pairs)
        cwd = 10.0 * sum(cwd_loss(s_fpn[s], t_fpn[t], 1.0) for _, s, t, _, _ in pairs)
    torch.testing.assert_close(losses["loss_fitnet"].detach(), fitnet)
    torch.testing.assert_close(losses["loss_pkd"].detach(), pkd)
    torch.testing.assert_close(losses["loss_cwd"].detach(), cwd)
    if logits:
        s_logits, t_logits = inputs.student_head[0], inputs.teacher_head[0]
        assert len(s_logits) == 5
        with torch.no_grad():
            expected = 5.0 * sum(cwd_loss(a, b, 1.0) for a, b in zip(s_logits, t_logits))
        torch.testing.assert_close(losses["loss_cwd_logits"].detach(), expected)


def test_student_equal_to_teacher_gives_zero_losses(tmp_path, monkeypatch):
    # FitNet with CONNECTOR align (identity at equal channels) is then plain MSE; PKD and CWD need no connector.
    model = build(tmp_path, "retinanet", "retinanet", METHODS, "KD.FITNET.CONNECTOR", "align",
                  "KD.CWD.LOGITS_WEIGHT", "5.0").train()
    assert len(list(model.kd_fitnet.parameters())) == 0
    model.student.load_state_dict(model.teacher.state_dict())
    losses, _ = run_step(model, monkeypatch)
    for k in ("loss_fitnet", "loss_pkd", "loss_cwd", "loss_cwd_logits"):
        # The teacher runs from its BN-folded copy: equal within float rounding.
        assert abs(float(losses[k].detach())) < 1e-4, (k, float(losses[k].detach()))


def test_different_channels_need_a_connector(tmp_path, monkeypatch):
    model = build(tmp_path, "fcos", "rcnn", METHODS, "TEACHER.MODEL.FPN.OUT_CHANNELS", "128",
                  "KD.PKD.CONNECTOR", "conv1x1", "KD.CWD.CONNECTOR", "align").train()
    for cls in (PKDFPN, CWDFPN):
        key = f"KD.{cls.NAME.upper()}.CONNECTOR"
        msg = f"the student's p3 has 256 channels and the teacher's p3 128; set {key}"
        with pytest.raises(ConfigError, match=msg) as e:
            cls.from_config(cfg_with(key, ""), model.pair)
        assert "\n" not in str(e.value)
    assert [tuple(c.weight.shape[:2]) for c in model.kd_pkd.connectors] == [(128, 256)] * 4
    losses, _ = run_step(model, monkeypatch)
    for k in ("loss_fitnet", "loss_pkd", "loss_cwd"):
        assert torch.isfinite(losses[k]) and losses[k] > 0, k


def test_cwd_logits_need_dense_student_and_teacher(tmp_path):
    cfg = cfg_with("KD.CWD.LOGITS_WEIGHT", 5.0)
    with pytest.raises(ConfigError, match="needs RetinaNet/FCOS student and teacher; the student is rcnn") as e:
        CWDFPN.from_config(cfg, pair_of(tmp_path, "rcnn", "rcnn"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="the student is fcos and the teacher rcnn") as e:
        CWDFPN.from_config(cfg, pair_of(tmp_path, "fcos", "rcnn"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="720 class-logit channels.*teacher's 80") as e:
        CWDFPN.from_config(cfg, pair_of(tmp_path, "retinanet", "fcos"))
    assert "\n" not in str(e.value)
    assert CWDFPN.from_config(cfg, pair_of(tmp_path, "fcos", "fcos")).NEEDS == ("fpn", "dense_head")


def test_official_defaults():
    cfg = d2_defaults()
    # mmrazor 90c7af1 configs/distill/mmdet/cwd/cwd_fpn_{frcnn,retina}_r101_*_r50_1x_coco.py: tau 1, loss_weight 10.
    assert (cfg.KD.CWD.TAU, cfg.KD.CWD.LOSS_WEIGHT) == (1.0, 10.0)
    # mmrazor v0.3.1 (2dad240) configs/distill/cwd/cwd_cls_head_gfl_r101_fpn_gfl_r50_fpn_1x_coco.py: tau 1 (weight 5,
    # here off unless set).
    assert (cfg.KD.CWD.LOGITS_TAU, cfg.KD.CWD.LOGITS_WEIGHT, cfg.KD.CWD.CONNECTOR) == (1.0, 0.0, "")
    # No official detection FitNet config: weight 1.0 and a 1x1 conv per level, this toolkit's choice.
    assert (cfg.KD.FITNET.LOSS_WEIGHT, cfg.KD.FITNET.CONNECTOR) == (1.0, "conv1x1")
    # PKD: None resolves by the teacher's family (mmrazor configs/distill/mmdet/pkd/*, see PKD_WEIGHT above).
    assert (cfg.KD.PKD.LOSS_WEIGHT, list(cfg.KD.PKD.LEVELS), cfg.KD.PKD.CONNECTOR) == (None, [], "")
    assert PKDFPN.resolve_weight(None, "rcnn") == 6.0
    assert PKDFPN.resolve_weight(None, "retinanet") == 10.0
    assert PKDFPN.resolve_weight(None, "fcos") == 10.0
    assert PKDFPN.resolve_weight(None, "other") == 6.0
    assert PKDFPN.resolve_weight(3, "retinanet") == 3.0


def test_bad_keys_are_one_line():
    pairs = [(8, "p3", "p3", 256, 256), (16, "p4", "p4", 256, 256)]
    with pytest.raises(ConfigError, match=r"unknown KD.FITNET.CONNECTOR 'conv3x3'. Valid choices") as e:
        fpn_connectors("conv3x3", pairs, "FitNet")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"KD.PKD.LEVELS \['p2'\]: 'p2' is not a paired student FPN level; "
                                          r"valid: p3, p4") as e:
        select_levels(pairs, ["p2"], "KD.PKD.LEVELS")
    assert "\n" not in str(e.value)
    assert select_levels(pairs, ["p4"], "KD.PKD.LEVELS") == pairs[1:]
    assert select_levels(pairs, [], "KD.PKD.LEVELS") == pairs


def test_cwd_declares_dense_head_only_when_logits_are_on():
    pairs = [(8, "p3", "p3", 8, 8)]
    assert CWDFPN(pairs, "", 1.0, 10.0).NEEDS == ("fpn",)
    assert CWDFPN(pairs, "", 1.0, 10.0, [(0, 0)], 1.0, 5.0).NEEDS == ("fpn", "dense_head")
    assert CWDFPN.NEEDS == ("fpn",)


@pytest.mark.parametrize("name, families, check", [
    ("FitNet/FitNet-R18-R101.yaml", ("rcnn", "rcnn"),
     lambda m: m.kd_fitnet.loss_weight == 1.0 and len(m.kd_fitnet.connectors) == 5),
    ("PKD/PKD-R50-R101.yaml", ("rcnn", "rcnn"),
     lambda m: m.kd_pkd.loss_weight == 6.0 and [s for s, _ in m.kd_pkd.levels] == ["p2", "p3", "p4", "p5"]),
    ("CWD/CWD-RetinaNet-R50-R101.yaml", ("retinanet", "retinanet"),
     lambda m: (m.kd_cwd.loss_weight, m.kd_cwd.tau, len(m.kd_cwd.levels)) == (10.0, 1.0, 5)),
])
def test_example_configs_build(name, families, check):
    cfg = get_kd_cfg(os.path.join(DET, name), TINY_OPTS + ["TEACHER.MODEL.WEIGHTS", ""])
    model = build_kd_model(cfg)
    assert (model.pair.student_family, model.pair.teacher_family) == families
    assert check(model)


def test_no_common_level_is_one_line():
    pair = DetectorPair.build(stub_detector([4, 8]), stub_detector([16, 32]))
    cfg = d2_defaults()
    for cls in (PKDFPN, CWDFPN):
        with pytest.raises(ConfigError, match="no FPN level with the same stride") as e:
            cls.from_config(cfg, pair)
        assert "\n" not in str(e.value)
