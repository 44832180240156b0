"""FGD and MGD on paired FPN levels: training steps across families (Mask R-CNN included), an image
without boxes, the loss on the real model path against kd_cls's losses, the official per-family
defaults, one-line errors and the example configs."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
from detectron2.config import CfgNode as CN  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_cls.config import ConfigError  # noqa: E402
from kd_cls.losses import FGDLoss, MGDLoss  # noqa: E402
from kd_det import build_kd_model, get_kd_cfg  # noqa: E402
from kd_det.methods.fgd import FGDFPN, resolve_fgd_values  # noqa: E402
from kd_det.methods.mgd import MGDFPN, resolve_mgd_values  # noqa: E402
from kd_det.pairing import DetectorPair, check_needs, family_of_arch  # noqa: E402
from kd_det.teacher_cfg import build_teacher_cfg  # noqa: E402
from kd_det.testing import TINY_OPTS, synthetic_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET = os.path.join(REPO, "configs", "detection")
CFG = {
    "rcnn": os.path.join(DET, "COCO-Detection", "faster_rcnn_R_18_FPN_3x.yaml"),
    "retinanet": os.path.join(DET, "COCO-Detection", "retinanet_R_18_FPN_3x.yaml"),
    "fcos": os.path.join(DET, "COCO-Detection", "fcos_R_18_FPN_1x.yaml"),
    "mask_rcnn": os.path.join(DET, "COCO-InstanceSegmentation", "mask_rcnn_R_18_FPN_3x.yaml"),
}
FAMILY = {"rcnn": "rcnn", "retinanet": "retinanet", "fcos": "fcos", "mask_rcnn": "rcnn"}

# The official values, literally. FGD: yzd-v/FGD at c03a6cf3b3cb3cbfd5554dbf4766e7135747d22d,
# configs/distillers/fgd/fgd_{retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco,
# faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco, fcos_r101_distill_fcos_r50_2x_coco}.py.
# (TEMP, ALPHA, BETA, GAMMA, LAMBDA)
FGD_OFFICIAL = {
    "retinanet": (0.5, 0.001, 0.0005, 0.0005, 0.000005),
    "rcnn": (0.5, 0.00005, 0.000025, 0.00005, 0.0000005),
    "fcos": (0.8, 0.0016, 0.0008, 0.0008, 0.000008),
    "other": (0.5, 0.001, 0.0005, 0.0005, 0.000005),  # no recipe: RetinaNet's
}
# MGD: yzd-v/MGD at 2c9da0b28625eb948db57afc02c824452c3910fe, det/configs/distillers/mgd/
# retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py and
# cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py.
# (ALPHA, LAMBDA)
MGD_OFFICIAL = {
    "retinanet": (0.00002, 0.65),
    "rcnn": (0.0000005, 0.45),
    "fcos": (0.00002, 0.65),  # no recipe: RetinaNet's
    "other": (0.00002, 0.65),
}
STUDENT_LOSSES = {
    "rcnn": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"},
    "mask_rcnn": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_mask"},
    "retinanet": {"loss_cls", "loss_box_reg"},
    "fcos": {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"},
}
# The official FeatureLoss state-dict keys of one level (yzd-v/FGD mmdet/distillation/losses/fgd.py).
FGD_KEYS = {f"{m}.{p}" for m in ("conv_mask_s", "conv_mask_t") for p in ("weight", "bias")} | {
    f"channel_add_conv_{side}.{i}.{p}" for side in "st" for i in (0, 1, 3) for p in ("weight", "bias")}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(tmp_path, student, teacher, methods, *opts):
    path = tmp_path / f"{teacher}-to-{student}.yaml"
    path.write_text(f'_BASE_: "{CFG[student]}"\nTEACHER:\n  CONFIG_FILE: "{CFG[teacher]}"\n'
                    f"KD:\n  METHODS: {list(methods)}\n")
    torch.manual_seed(0)
    return build_kd_model(get_kd_cfg(str(path), TINY_OPTS + list(opts))).train()


def _grad_norm(modules):
    return sum(float(p.grad.abs().sum()) for m in modules for p in m.parameters() if p.grad is not None)


def _student_fpn(model):
    return [m for n, m in model.student.backbone.named_children() if n.startswith("fpn_")]


def with_masks(batch):
    """Box-shaped instance masks for Mask R-CNN students."""
    from detectron2.structures import BitMasks

    for x in batch:
        inst = x["instances"]
        masks = torch.zeros(len(inst), *inst.image_size, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, inst.gt_boxes.tensor.round().long().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
    return batch


def _spy(monkeypatch, cls, seen):
    orig = cls.forward

    def spy(self, inputs):
        seen["inputs"], seen["rng_before"] = inputs, torch.get_rng_state()
        out = orig(self, inputs)
        seen["rng_after"], seen["out"] = torch.get_rng_state(), out
        return out

    monkeypatch.setattr(cls, "forward", spy)


@pytest.mark.parametrize("student, teacher, opts", [
    ("rcnn", "rcnn", []),
    ("mask_rcnn", "retinanet", []),  # an R-CNN student with a mask head
    ("retinanet", "retinanet", []),
    # A teacher FPN of another width: both methods add the official 1x1 align conv per level.
    ("retinanet", "fcos", ["TEACHER.MODEL.FPN.OUT_CHANNELS", "128"]),
    ("fcos", "fcos", []),
    ("fcos", "rcnn", []),
])
def test_both_methods_train_one_step(tmp_path, student, teacher, opts):
    model = build(tmp_path, student, teacher, ["FGD", "MGD"], *opts)
    family = FAMILY[student]
    assert model.pair.student_family == family and model.pair.teacher_family == teacher
    pairs = model.pair.fpn_pairs
    assert [p[0] for p in pairs] == ([4, 8, 16, 32, 64] if family == teacher == "rcnn" else
                                     [8, 16, 32, 64, 128] if "rcnn" not in (family, teacher) else [8, 16, 32, 64])
    fgd, mgd = model.kd_fgd, model.kd_mgd
    assert len(fgd.losses) == len(mgd.losses) == len(pairs)
    # Hyperparameters: the student family's official values.
    assert [(x.temp, x.alpha, x.beta, x.gamma, x.lambda_) for x in fgd.losses] == [FGD_OFFICIAL[family]] * len(pairs)
    assert [(x.alpha, x.lambda_) for x in mgd.losses] == [MGD_OFFICIAL[family]] * len(pairs)
    differ = bool(opts)
    for x in list(fgd.losses) + list(mgd.losses):
        assert (x.align is not None) == differ
        if differ:
            assert tuple(x.align.weight.shape[:2]) == (128, 256)
    assert set(fgd.losses[0].state_dict()) == FGD_KEYS | ({"align.weight", "align.bias"} if differ else set())

    if student == "mask_rcnn":
        assert model.student.roi_heads.mask_on
    with EventStorage():
        losses = model(with_masks(synthetic_batch()) if student == "mask_rcnn" else synthetic_batch())
    assert STUDENT_LOSSES[student] <= set(losses)
    for k in ("loss_fgd", "loss_mgd"):
        assert torch.isfinite(losses[k]) and losses[k] > 0, k
    # Each KD loss alone reaches the student's FPN and its own modules, never the teacher.
    for k, method in (("loss_fgd", fgd), ("loss_mgd", mgd)):
        model.zero_grad(set_to_none=True)
        losses[k].backward(retain_graph=True)
        assert _grad_norm(_student_fpn(model)) > 0, k
        assert _grad_norm([method]) > 0, k
        assert all(p.grad is None for p in model.teacher.parameters()), k
        grads = [p.grad for p in model.student.parameters() if p.grad is not None]
        assert all(torch.isfinite(g_).all() for g_ in grads), k


def test_fgd_loss_on_the_model_path_with_an_image_without_boxes(tmp_path, monkeypatch):
    seen = {}
    _spy(monkeypatch, FGDFPN, seen)
    model = build(tmp_path, "rcnn", "retinanet", ["FGD"], "KD.FGD.LOSS_WEIGHT", "2.0")
    batch = synthetic_batch()
    batch[1]["instances"] = batch[1]["instances"][:0]  # the second image: background only
    with EventStorage():
        losses = model(batch)
    inputs = seen["inputs"]
    boxes = [i.gt_boxes.tensor for i in inputs.gt_instances]
    assert [b.shape[0] for b in boxes] == [2, 0] and inputs.image_sizes == [(64, 96), (64, 96)]
    loss = losses["loss_fgd"]
    assert torch.isfinite(loss) and loss > 0
    # FGD draws no random numbers.
    assert torch.equal(seen["rng_before"], seen["rng_after"])
    refs = []
    for i, (_, s, t, cs, ct) in enumerate(model.pair.fpn_pairs):
        # A stand-alone kd_cls loss with the official R-CNN values and the method's weights, loaded
        # under the official FeatureLoss key names.
        ref = FGDLoss(cs, ct, temp=0.5, alpha=0.00005, beta=0.000025, gamma=0.00005, lambda_=0.0000005)
        ref.load_state_dict(model.kd_fgd.losses[i].state_dict(), strict=True)
        refs.append((s, t, ref))

    def by_hand(student_of, images):
        return sum(ref(student_of(s, t)[images], inputs.teacher_fpn[t][images], boxes[images],
                       inputs.image_sizes[images]) for s, t, ref in refs)

    with torch.no_grad():
        expected = by_hand(lambda s, t: inputs.student_fpn[s], slice(0, 2))
        # Per image (each term is a sum over images divided by N), the empty one has background terms only.
        per_image = [by_hand(lambda s, t: inputs.student_fpn[s], slice(i, i + 1)) for i in range(2)]
        # Student features equal to the teacher's: every term is 0 (the context transforms start at 0).
        same = by_hand(lambda s, t: inputs.teacher_fpn[t], slice(0, 2))
    torch.testing.assert_close(loss.detach(), 2.0 * expected, rtol=1e-5, atol=0)
    assert all(torch.isfinite(v) and v > 0 for v in per_image)
    torch.testing.assert_close(expected, (per_image[0] + per_image[1]) / 2, rtol=1e-4, atol=0)
    assert float(same) == 0.0
    loss.backward()
    assert _grad_norm(_student_fpn(model)) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.student.parameters() if p.grad is not None)
    assert all(p.grad is None for p in model.teacher.parameters())


def test_mgd_loss_replays_from_the_default_generator(tmp_path, monkeypatch):
    seen = {}
    _spy(monkeypatch, MGDFPN, seen)
    model = build(tmp_path, "retinanet", "rcnn", ["MGD"])
    with EventStorage():
        losses = model(synthetic_batch())
    inputs = seen["inputs"]
    refs = []
    for i, (_, s, t, cs, ct) in enumerate(model.pair.fpn_pairs):
        ref = MGDLoss(cs, ct, alpha=0.00002, lambda_=0.65)  # a RetinaNet student: MGD's RetinaNet values
        ref.load_state_dict(model.kd_mgd.losses[i].state_dict(), strict=True)
        refs.append((s, t, ref))
    with torch.no_grad():
        # Replay from the generator state the method started from, coarsest level first (the official order).
        torch.set_rng_state(seen["rng_before"])
        expected = sum(ref(inputs.student_fpn[s], inputs.teacher_fpn[t]) for s, t, ref in reversed(refs))
        # One (N, 1, H, W) draw per level and nothing else: the generator ends where the method's did.
        assert torch.equal(torch.get_rng_state(), seen["rng_after"])
        torch.set_rng_state(seen["rng_before"])
        finest_first = sum(ref(inputs.student_fpn[s], inputs.teacher_fpn[t]) for s, t, ref in refs)
    torch.testing.assert_close(losses["loss_mgd"].detach(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(finest_first, expected, rtol=1e-6, atol=0)


def _node(**values):
    node = CN()
    for k in ("TEMP", "ALPHA", "BETA", "GAMMA", "LAMBDA"):
        node[k] = values.get(k)
    return node


def test_defaults_resolve_to_the_official_values_per_family():
    cfg = get_kd_cfg(CFG["retinanet"], TINY_OPTS)
    assert cfg.KD.FGD.LOSS_WEIGHT == 1.0 and cfg.KD.MGD.LOSS_WEIGHT == 1.0
    assert [cfg.KD.FGD[k] for k in ("TEMP", "ALPHA", "BETA", "GAMMA", "LAMBDA")] == [None] * 5
    assert cfg.KD.MGD.ALPHA is None and cfg.KD.MGD.LAMBDA is None
    for family, values in FGD_OFFICIAL.items():
        got = resolve_fgd_values(cfg.KD.FGD, family)
        assert tuple(got[k] for k in ("TEMP", "ALPHA", "BETA", "GAMMA", "LAMBDA")) == values, family
    for family, values in MGD_OFFICIAL.items():
        got = resolve_mgd_values(cfg.KD.MGD, family)
        assert (got["ALPHA"], got["LAMBDA"]) == values, family
    # A set key wins; the others keep the family's values.
    assert resolve_fgd_values(_node(TEMP=0.7), "fcos") == dict(TEMP=0.7, ALPHA=0.0016, BETA=0.0008, GAMMA=0.0008,
                                                                LAMBDA=0.000008)
    node = CN()
    node.ALPHA, node.LAMBDA = None, 0.5
    assert resolve_mgd_values(node, "rcnn") == dict(ALPHA=0.0000005, LAMBDA=0.5)


@pytest.mark.parametrize("resolve, values, match", [
    (resolve_fgd_values, dict(TEMP=0.0), r"KD.FGD.TEMP must be > 0 .*got 0.0"),
    (resolve_fgd_values, dict(BETA=-1e-4), r"KD.FGD.BETA must be >= 0 .*got -0.0001"),
    (resolve_fgd_values, dict(ALPHA="1e-3"), r"KD.FGD.ALPHA must be a number or None .*got '1e-3'"),
    (resolve_mgd_values, dict(LAMBDA=1.5), r"KD.MGD.LAMBDA must be in \[0, 1\] .*got 1.5"),
    (resolve_mgd_values, dict(ALPHA=-2e-5), r"KD.MGD.ALPHA must be >= 0 .*got -2e-05"),
])
def test_bad_values_are_one_line(resolve, values, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve(_node(**values), "retinanet")
    assert "\n" not in str(e.value)


class _Backbone(torch.nn.Module):
    def __init__(self, strides, channels):
        super().__init__()
        self.strides, self.channels = strides, channels

    def output_shape(self):
        from detectron2.layers import ShapeSpec

        return {f"p{s.bit_length() - 1}": ShapeSpec(channels=self.channels, stride=s) for s in self.strides}


class _Det(torch.nn.Module):
    """A detector of the ``other`` family: only a backbone with named strides."""

    def __init__(self, strides, channels=8):
        super().__init__()
        self.backbone = _Backbone(strides, channels)


def test_from_config_other_family_and_bad_value():
    pair = DetectorPair.build(_Det([8, 16, 32], 8), _Det([16, 32, 64], 16))
    assert pair.student_family == "other" and [p[0] for p in pair.fpn_pairs] == [16, 32]
    cfg = get_kd_cfg(CFG["retinanet"], TINY_OPTS)
    fgd, mgd = FGDFPN.from_config(cfg, pair), MGDFPN.from_config(cfg, pair)
    assert fgd.levels == mgd.levels == [("p4", "p4"), ("p5", "p5")]
    assert [(x.temp, x.alpha, x.beta, x.gamma, x.lambda_) for x in fgd.losses] == [FGD_OFFICIAL["other"]] * 2
    assert [(x.alpha, x.lambda_) for x in mgd.losses] == [MGD_OFFICIAL["other"]] * 2
    assert all(tuple(x.align.weight.shape[:2]) == (16, 8) for x in list(fgd.losses) + list(mgd.losses))
    cfg = get_kd_cfg(CFG["retinanet"], TINY_OPTS + ["KD.MGD.LAMBDA", "-0.1"])
    with pytest.raises(ConfigError, match=r"KD.MGD.LAMBDA must be in \[0, 1\].*got -0.1") as e:
        MGDFPN.from_config(cfg, pair)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls", [FGDFPN, MGDFPN])
def test_detector_without_paired_levels_is_one_line(cls):
    # Both serve any family; what they cannot serve is a pair with no FPN level of the same stride.
    assert cls.STUDENT_FAMILIES is None and cls.TEACHER_FAMILIES is None
    pair = DetectorPair.build(_Det([4, 8]), _Det([16, 32]))
    with pytest.raises(ConfigError, match=f"{cls.NAME}: no FPN level with the same stride") as e:
        check_needs(cls, pair)
    assert "\n" not in str(e.value) and "p2 (stride 4)" in str(e.value)


EXAMPLES = {
    "FGD/FGD-RetinaNet-R50-R101.yaml": ("RetinaNet", ["neck", "head"], FGD_OFFICIAL["retinanet"]),
    "FGD/FGD-FasterRCNN-R50-R101.yaml": ("GeneralizedRCNN", ["neck", "head"], FGD_OFFICIAL["rcnn"]),
    "FGD/FGD-FCOS-R50-R101.yaml": ("FCOS", ["neck", "head"], FGD_OFFICIAL["fcos"]),
    "MGD/MGD-RetinaNet-R50-R101.yaml": ("RetinaNet", ["neck", "head"], MGD_OFFICIAL["retinanet"]),
    "MGD/MGD-FasterRCNN-R50-R101.yaml": ("GeneralizedRCNN", [], MGD_OFFICIAL["rcnn"]),
}


def _example_cfg(name):
    cfg = get_kd_cfg(os.path.join(DET, name), TINY_OPTS + ["TEACHER.MODEL.WEIGHTS", ""])
    arch, inherit, values = EXAMPLES[name]
    method = os.path.basename(os.path.dirname(name))
    assert list(cfg.KD.METHODS) == [method] and list(cfg.KD.INHERIT) == inherit
    assert cfg.MODEL.META_ARCHITECTURE == arch and cfg.MODEL.RESNETS.DEPTH == 50
    # The file states the official values, equal to what None resolves to for the student's family.
    family = family_of_arch(arch)
    if method == "FGD":
        assert tuple(cfg.KD.FGD[k] for k in ("TEMP", "ALPHA", "BETA", "GAMMA", "LAMBDA")) == values
        assert tuple(resolve_fgd_values(cfg.KD.FGD, family).values()) == values == FGD_OFFICIAL[family]
    else:
        assert (cfg.KD.MGD.ALPHA, cfg.KD.MGD.LAMBDA) == values == MGD_OFFICIAL[family]
    return cfg, method, family, values


def test_example_configs_read():
    for name in EXAMPLES:
        cfg, *_ = _example_cfg(name)
        tcfg = build_teacher_cfg(cfg)
        assert tcfg.MODEL.META_ARCHITECTURE == cfg.MODEL.META_ARCHITECTURE and tcfg.MODEL.RESNETS.DEPTH == 101


@pytest.mark.parametrize("name", ["FGD/FGD-RetinaNet-R50-R101.yaml", "MGD/MGD-FasterRCNN-R50-R101.yaml"])
def test_example_config_builds(name):
    cfg, method, family, values = _example_cfg(name)
    torch.manual_seed(0)
    model = build_kd_model(cfg)
    assert (model.pair.student_family, model.pair.teacher_family) == (family, family)
    assert len(model.teacher.backbone.bottom_up.stages[2]) == 23  # ResNet-101's res4
    losses = getattr(model, f"kd_{method.lower()}").losses
    got = [(x.temp, x.alpha, x.beta, x.gamma, x.lambda_) if method == "FGD" else (x.alpha, x.lambda_) for x in losses]
    assert got == [values] * 5
