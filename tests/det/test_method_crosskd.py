"""CrossKD (kd_det/methods/crosskd.py): cross-head losses on RetinaNet and FCOS, where its gradients go,
the official defaults, the one-line errors, an identical teacher, and the scale alignment by hand."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_cls.config import ConfigError  # noqa: E402
from kd_cls.losses import kd_quality_focal_loss  # noqa: E402
from kd_det import build_kd_model, get_kd_cfg  # noqa: E402
from kd_det.methods.crosskd import CrossKD, align_scale, aligned_iou_loss  # noqa: E402
from kd_det.testing import FAMILY_CONFIGS, TINY_OPTS, synthetic_batch, write_kd_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET = os.path.join(REPO, "configs", "detection")
FAMILY_CFG = {f: os.path.join(DET, path) for f, path in FAMILY_CONFIGS.items()}
KD_LOSSES = ("loss_crosskd_cls", "loss_crosskd_reg")
# jbwang1997/CrossKD at 87e156a, configs/crosskd/: crosskd_r50_retinanet_r101_fpn_2x_coco.py and
# crosskd_r50_fcos_r101-2x-ms_caffe_fpn_gn-head_2x_ms_coco.py, kd_cfg.
OFFICIAL = {
    "retinanet": {"REUSED_HEAD_IDX": 3, "CLS_WEIGHT": 1.0, "REG_WEIGHT": 1.0, "REG_LOSS": "giou", "BETA": 1.0},
    "fcos": {"REUSED_HEAD_IDX": 2, "CLS_WEIGHT": 0.4, "REG_WEIGHT": 0.75, "REG_LOSS": "iou", "BETA": 1.0},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_config(tmp_path, student: str, teacher: str, extra: str = "") -> str:
    return write_kd_config(tmp_path, DET, student, teacher, ["CrossKD"], extra)


def build(tmp_path, student, teacher, *opts):
    torch.manual_seed(0)
    return build_kd_model(get_kd_cfg(write_config(tmp_path, student, teacher), TINY_OPTS + list(opts)))


def _blocks(subnet):
    """[[modules of conv block 1], [block 2], ...] of a detectron2 head subnet (each ends with its ReLU)."""
    out, cur = [], []
    for m in subnet.children():
        cur.append(m)
        if isinstance(m, torch.nn.ReLU):
            out.append(cur)
            cur = []
    return out


def _capture(monkeypatch):
    """Record the ``inputs`` and the flattened predictions of CrossKD's next forward."""
    seen = {}
    orig = CrossKD.predictions

    def spy(self, inputs):
        out = orig(self, inputs)
        seen.update(inputs=inputs, out={k: v.detach() for k, v in out.items()})
        return out

    monkeypatch.setattr(CrossKD, "predictions", spy)
    return seen


def _expected_cls(family, seen, normalizer, pred_key="cross_logits"):
    """``CLS_WEIGHT * kd_quality_focal_loss`` called by hand on the captured logits."""
    out, weight = seen["out"], None
    if family == "retinanet":  # ignored anchors (label -1) take no part
        weight = (torch.stack(seen["inputs"].anchor_labels) >= 0).reshape(-1).float()
    return OFFICIAL[family]["CLS_WEIGHT"] * kd_quality_focal_loss(
        out[pred_key], out["teacher_logits"], weight, beta=1.0, avg_factor=float(normalizer))


def _has_grad(module):
    return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_trains_and_reaches_only_the_head_before_the_cut(tmp_path, family, monkeypatch):
    model = build(tmp_path, family, family).train()
    method = model.kd_crosskd
    idx = OFFICIAL[family]["REUSED_HEAD_IDX"]
    assert method.reused_head_idx == idx
    seen = _capture(monkeypatch)
    with EventStorage():
        losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(float(losses[k].detach()) > 0 for k in KD_LOSSES)
    # The cls loss is the library's QFL on the cross-head and teacher logits, over the student's normaliser.
    torch.testing.assert_close(losses["loss_crosskd_cls"].detach(),
                               _expected_cls(family, seen, model.student.loss_normalizer))
    (losses["loss_crosskd_cls"] + losses["loss_crosskd_reg"]).backward()
    head = model.student.head
    for name in ("cls_subnet", "bbox_subnet"):
        blocks = _blocks(getattr(head, name))
        assert len(blocks) == 4
        for i, block in enumerate(blocks, start=1):
            conv = block[0]
            if i <= idx:  # blocks up to the cut feed the teacher's head: they learn from CrossKD
                assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0, (name, i)
            else:  # the student's own later blocks are not on the cross-head path
                assert all(p.grad is None for m in block for p in m.parameters()), (name, i)
    for name in ("cls_score", "bbox_pred", "ctrness"):
        if hasattr(head, name):
            assert all(p.grad is None for p in getattr(head, name).parameters()), name
    assert _has_grad(model.student.backbone)
    assert all(p.grad is None for p in model.teacher.parameters())


def test_official_defaults_per_family(tmp_path):
    for family, official in OFFICIAL.items():
        cfg = get_kd_cfg(write_config(tmp_path, family, family), TINY_OPTS)
        for key in ("REUSED_HEAD_IDX", "CLS_WEIGHT", "REG_WEIGHT", "REG_LOSS"):
            assert cfg.KD.CROSSKD.get(key) is None  # resolved per family when built
        resolved = CrossKD.resolved(cfg, family)
        assert {k: resolved[k] for k in official} == official
        assert resolved["LOSS_WEIGHT"] == 1.0


@pytest.mark.parametrize("student, teacher, words", [
    ("rcnn", "rcnn", "rcnn student"),
    ("retinanet", "fcos", "the student is retinanet and the teacher fcos"),
])
def test_unsupported_pairs_are_one_line_errors(tmp_path, student, teacher, words):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, student, teacher)
    msg = str(e.value)
    assert "\n" not in msg and "CrossKD" in msg and words in msg


def test_reused_head_idx_0_and_the_range(tmp_path):
    # Index 0 reuses the whole teacher head on the (aligned) FPN levels: no student head layer is on the path.
    model = build(tmp_path, "retinanet", "retinanet", "KD.CROSSKD.REUSED_HEAD_IDX", "0").train()
    assert model.kd_crosskd.student_taps() == []
    with EventStorage():
        losses = model(synthetic_batch())
    assert all(float(losses[k].detach()) > 0 and torch.isfinite(losses[k]) for k in KD_LOSSES)
    (losses["loss_crosskd_cls"] + losses["loss_crosskd_reg"]).backward()
    assert all(p.grad is None for p in model.student.head.parameters())
    fpn = [m for n, m in model.student.backbone.named_children() if n.startswith("fpn_output")]
    assert fpn and any(_has_grad(m) for m in fpn)
    assert all(p.grad is None for p in model.teacher.parameters())
    # Bad values on the same pair: one-line errors naming the value and what is valid.
    path = write_config(tmp_path, "retinanet", "retinanet")
    for opts, words in ((["KD.CROSSKD.REUSED_HEAD_IDX", "9"], ("REUSED_HEAD_IDX 9", "0..4")),
                        (["KD.CROSSKD.REG_LOSS", "l1"], ("REG_LOSS 'l1'", "giou, iou"))):
        with pytest.raises(ConfigError) as e:
            CrossKD.from_config(get_kd_cfg(path, TINY_OPTS + opts), model.pair)
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_identical_teacher_gives_its_own_predictions(tmp_path, family, monkeypatch):
    model = build(tmp_path, family, family).train()
    if family == "fcos":
        # detectron2's FCOS decodes relu(deltas): positive deltas keep every box non-empty, so that
        # identical boxes have IoU 1 (an empty box has IoU 0 even with itself).
        with torch.no_grad():
            model.student.head.bbox_pred.bias.fill_(1.0)
    model.teacher.load_state_dict(model.student.state_dict())
    seen = _capture(monkeypatch)
    with EventStorage():
        losses = model(synthetic_batch())
    out = seen["out"]
    # The cross head on the student's (equal) features reproduces the teacher's predictions.
    torch.testing.assert_close(out["cross_logits"], out["teacher_logits"], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out["cross_deltas"], out["teacher_deltas"], atol=2e-3, rtol=1e-3)
    # Identical boxes: the regression loss is ~0 (it is ~1e-2 with a different teacher, see above).
    assert abs(float(losses["loss_crosskd_reg"].detach())) < 1e-5
    # The cls loss is the QFL of the teacher's logits against themselves.
    expected = _expected_cls(family, seen, model.student.loss_normalizer, pred_key="teacher_logits")
    torch.testing.assert_close(losses["loss_crosskd_cls"].detach(), expected, atol=1e-5, rtol=0)


def test_align_scale_by_hand():
    # One image, two channels, 1x4 maps; per channel over N*H*W, unbiased std, std + 1e-6.
    s = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, 0.0, 8.0]]]])
    t = torch.tensor([[[[0.0, 0.0, 2.0, 2.0]], [[5.0, 5.0, 5.0, 5.0]]]])
    # Channel 0: student mean 2.5, std sqrt(5/3); teacher mean 1, std sqrt(4/3):
    #   (s - 2.5) / (sqrt(5/3) + 1e-6) * sqrt(4/3) + 1.
    # Channel 1: teacher std 0, so every value becomes the teacher's mean 5.
    r = (4.0 / 3.0) ** 0.5 / ((5.0 / 3.0) ** 0.5 + 1e-6)
    expected = torch.tensor([[[[1 - 1.5 * r, 1 - 0.5 * r, 1 + 0.5 * r, 1 + 1.5 * r]], [[5.0, 5.0, 5.0, 5.0]]]])
    torch.testing.assert_close(align_scale(s, t), expected)
    assert abs(float(expected[0, 0, 0, 0]) - (1 - 1.5 * 0.894427)) < 1e-5  # sqrt(4/5) = 0.894427...
    # Gradients reach the student only.
    s.requires_grad_(True)
    t.requires_grad_(True)
    align_scale(s, t).sum().backward()
    assert s.grad is not None and t.grad is None


def test_box_losses_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # Overlap 1, union 7, enclosing box 9: GIoU = 1/7 - 2/9; IoU loss = -log(1/7).
    torch.testing.assert_close(aligned_iou_loss(a, b, "giou"), torch.tensor([1 - (1 / 7 - 2 / 9)]))
    torch.testing.assert_close(aligned_iou_loss(a, b, "iou"), torch.log(torch.tensor([7.0])))
    torch.testing.assert_close(aligned_iou_loss(a, a, "giou"), torch.zeros(1))


@pytest.mark.parametrize("name", ["CrossKD-RetinaNet-R50-R101.yaml", "CrossKD-FCOS-R50-R101.yaml"])
def test_example_config_builds(name):
    cfg = get_kd_cfg(os.path.join(DET, "CrossKD", name), TINY_OPTS + ["TEACHER.MODEL.WEIGHTS", ""])
    family = "fcos" if "FCOS" in name else "retinanet"
    assert CrossKD.resolved(cfg, family) == dict(OFFICIAL[family], LOSS_WEIGHT=1.0)
    torch.manual_seed(0)
    model = build_kd_model(cfg)
    assert model.kd_crosskd.reused_head_idx == OFFICIAL[family]["REUSED_HEAD_IDX"]
    assert model.pair.student_family == model.pair.teacher_family == family
