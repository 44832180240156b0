"""CrossKD: cross-head prediction mimicking for RetinaNet and FCOS: losses ``loss_crosskd_cls`` / ``_reg``.

Paper: Wang, Chen, Zheng, Li, Cheng, Hou, "CrossKD: Cross-Head Knowledge
Distillation for Object Detection", CVPR 2024 (arXiv 2306.11369).

What is distilled. The student's head is cut after its conv block
``KD.CROSSKD.REUSED_HEAD_IDX`` (both branches, every FPN level); that
intermediate tensor, scale-aligned to the teacher's tensor at the same point,
goes through the REST of the frozen teacher's head (the remaining subnet
blocks, then ``cls_score`` / ``bbox_pred``) with autograd on. These cross-head
predictions mimic the teacher's own predictions, so the gradients of the KD
losses reach only the student's head convs before the cut (and the FPN and
backbone below them), never the student's own later head layers nor the teacher.

* ``loss_crosskd_cls``: :func:`kd_cls.losses.kd_quality_focal_loss` (the official
  ``KDQualityFocalLoss``) between the cross-head class logits and the teacher's.
* ``loss_crosskd_reg``: GIoU (RetinaNet) or -log IoU (FCOS; ``KD.CROSSKD.REG_LOSS``)
  between the boxes decoded, with the student's ``box2box_transform`` on the
  student's anchors/points, from the cross-head regressions and from the teacher's,
  each anchor weighted by the teacher's max class score (sigmoid).
* RetinaNet: anchors labelled ``-1`` (ignored by detectron2's matcher) take no part
  in either loss (the official ``label_weights``). FCOS has no ignored points.
* Both are divided by the student's ``loss_normalizer``, the EMA of the positive
  count that detectron2's own losses update during the same forward (the official
  code divides by mmdet's ``avg_factor``: the positive count for RetinaNet; for FCOS
  the sum of the positives' centerness targets, which detectron2 does not use for
  its classification and box losses, so the student's own normaliser is used here).
* Times ``KD.CROSSKD.LOSS_WEIGHT`` and the official ``CLS_WEIGHT`` / ``REG_WEIGHT``.

Official source read: jbwang1997/CrossKD at commit
87e156a46259e3a516b65fc6a049b200b9ab0d54:
``mmdet/models/detectors/crosskd_retinanet.py`` and ``crosskd_fcos.py``
(``forward_crosskd_single`` / ``forward_hkd_single``, ``reuse_teacher_head``,
``align_scale``, ``pred_mimicking_loss_single`` / ``loss_by_feat``),
``mmdet/models/losses/iou_loss.py`` (``GIoULoss``, ``IoULoss``: eps 1e-6, IoU loss
``-log(clamp(IoU, eps))``) and ``mmdet/structures/bbox/bbox_overlaps.py``
(union and enclosing area clamped below at eps). Defaults per student family:

======================  =========  =====  ============================================================
key                     RetinaNet  FCOS   official config (``configs/crosskd/``)
======================  =========  =====  ============================================================
``REUSED_HEAD_IDX``     3          2      ``kd_cfg.reused_teacher_head_idx``
``CLS_WEIGHT``          1.0        0.4    ``kd_cfg.loss_cls_kd`` (``KDQualityFocalLoss``, ``beta=1``)
``REG_WEIGHT``          1.0        0.75   ``kd_cfg.loss_reg_kd`` ``loss_weight``
``REG_LOSS``            giou       iou    ``kd_cfg.loss_reg_kd`` type (``GIoULoss`` / ``IoULoss``)
======================  =========  =====  ============================================================

RetinaNet: ``crosskd_r50_retinanet_r101_fpn_2x_coco.py`` (and the same values in
``crosskd_r18_retinanet_r50_fpn_1x_coco.py``); FCOS:
``crosskd_r50_fcos_r101-2x-ms_caffe_fpn_gn-head_2x_ms_coco.py``. ``BETA`` 1.0 in both.

How blocks are counted (the official ``reused_teacher_head_idx``): 0 is the head's
input (the FPN level); ``i >= 1`` is the output of the i-th conv block before its
activation (mmdet's ``ConvModule(..., activate=False)``: conv, then norm if any).
detectron2's ``RetinaNetHead`` / ``FCOSHead`` subnets are ``nn.Sequential``\\ s of
``Conv2d, [norm,] ReLU`` blocks, so the tapped module is the one just before the
i-th ``ReLU`` (the conv in RetinaNet, the GroupNorm in FCOS). The aligned tensor
then goes through that ``ReLU`` (the official applies ``F.relu`` when ``i != 0``)
and the teacher's remaining blocks. The official FCOS cross head also computes a
centerness that no loss uses; it is skipped here. detectron2's FCOS decodes
``relu(deltas) * stride`` (mmdet's FCOS of these configs: ``exp``), so a point may
decode to an empty box; its IoU is 0 there, clamped to eps as mmdet does.

``align_scale`` (the official one): per channel, over ``N*H*W`` of one level, the
student's tensor is standardised with its mean and unbiased std (``std + 1e-6``)
and given the teacher's mean and unbiased std. (A channel with a single value,
e.g. a 1x1 top level of a batch of one, has std 0 here where the official's
unbiased std would be NaN.)

Levels: the student's ``head_in_features`` pair with the teacher's levels of the
same stride (``kd_det.pairing``); detectron2 names RetinaNet/FCOS levels p3-p7 as
mmdet does. The official sums per-level losses each divided by the same avg_factor;
here the levels are concatenated and divided once (equal up to the float eps).

The teacher's tensors at the cut and its predictions come from one pass of the
registered teacher's head under ``torch.inference_mode()`` on ``inputs.teacher_fpn``;
the cross head runs the same registered (frozen, ``requires_grad=False``) modules
with autograd on. The student's tensors at the cut come from forward hooks
(``student_taps``), or for index 0 from ``inputs.student_fpn``. ``DENSE_HEAD`` is
declared for the student's anchors and (RetinaNet) anchor labels only; the teacher's
``inputs.teacher_head`` is not read (that would run the teacher's head twice).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.losses import kd_quality_focal_loss

from .base import DENSE_HEAD, FPN, TEACHER_HEAD, KDMethod, register_kd_method

__all__ = ["CrossKD", "align_scale", "aligned_iou_loss", "FAMILY_DEFAULTS"]

# Official values per student family (see the module docstring for the config files).
FAMILY_DEFAULTS: Dict[str, Dict[str, object]] = {
    # configs/crosskd/crosskd_r50_retinanet_r101_fpn_2x_coco.py
    "retinanet": {"REUSED_HEAD_IDX": 3, "CLS_WEIGHT": 1.0, "REG_WEIGHT": 1.0, "REG_LOSS": "giou"},
    # configs/crosskd/crosskd_r50_fcos_r101-2x-ms_caffe_fpn_gn-head_2x_ms_coco.py
    "fcos": {"REUSED_HEAD_IDX": 2, "CLS_WEIGHT": 0.4, "REG_WEIGHT": 0.75, "REG_LOSS": "iou"},
}
REG_LOSSES = ("giou", "iou")
_F32_EPS = torch.finfo(torch.float32).eps
_ACTIVATIONS = (nn.ReLU,)


def align_scale(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The student's ``(N, C, H, W)`` tensor with the teacher's per-channel mean and std (over N, H, W).

    ``(s - mean_s) / (std_s + eps) * std_t + mean_t`` with unbiased stds, as the official
    ``align_scale``; gradients flow to ``student`` only.
    """
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"align_scale: channel counts differ: {student.shape[1]} vs {teacher.shape[1]}")
    dims = (0, 2, 3)
    count = student.shape[0] * student.shape[2] * student.shape[3]
    correction = 1 if count > 1 else 0
    s_mean = student.mean(dims, keepdim=True)
    s_std = student.std(dims, keepdim=True, correction=correction)
    teacher = teacher.detach()
    t_count = teacher.shape[0] * teacher.shape[2] * teacher.shape[3]
    t_mean = teacher.mean(dims, keepdim=True)
    t_std = teacher.std(dims, keepdim=True, correction=1 if t_count > 1 else 0)
    return (student - s_mean) / (s_std + eps) * t_std + t_mean


def aligned_iou_loss(pred: torch.Tensor, target: torch.Tensor, mode: str = "giou",
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-box loss of ``(M, 4)`` xyxy boxes against aligned targets, as mmdet's losses compute it.

    ``"giou"``: ``1 - GIoU`` (``GIoULoss``); ``"iou"``: ``-log(max(IoU, eps))`` (``IoULoss``, mode "log").
    Union and enclosing area are clamped below at ``eps`` (mmdet's ``bbox_overlaps``).
    """
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (area_p + area_t - overlap).clamp(min=eps)
    iou = overlap / union
    if mode == "iou":
        return -iou.clamp(min=eps).log()
    if mode != "giou":
        raise ValueError(f"aligned_iou_loss: unknown mode {mode!r}; valid: {', '.join(REG_LOSSES)}")
    enc_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = (enc_wh[:, 0] * enc_wh[:, 1]).clamp(min=eps)
    return 1 - (iou - (enclose - union) / enclose)


def _act_positions(subnet: nn.Module) -> List[int]:
    """Indices, in a ``Conv2d, [norm,] ReLU`` subnet, of each block's activation; raises on other layouts."""
    children = list(subnet.children()) if isinstance(subnet, nn.Sequential) else None
    acts = [i for i, m in enumerate(children or []) if isinstance(m, _ACTIVATIONS)]
    ok = children is not None and bool(acts) and acts[-1] == len(children) - 1
    start = 0
    for a in acts if ok else []:
        convs = [m for m in children[start:a] if isinstance(m, nn.Conv2d)]
        ok = ok and len(convs) == 1 and isinstance(children[start], nn.Conv2d) and a - start in (1, 2)
        ok = ok and not getattr(children[a], "inplace", False)  # the tapped tensor must stay as it is
        start = a + 1
    if not ok:
        raise ConfigError(f"CrossKD: the head subnet {type(subnet).__name__} is not a sequence of "
                          "Conv2d, [norm,] ReLU (not in-place) blocks as detectron2's RetinaNetHead/FCOSHead")
    return acts


def _widths(subnet: nn.Sequential) -> List[int]:
    """Channels at each cut point: index 0 is the input, i the i-th block's output."""
    convs = [m for m in subnet.children() if isinstance(m, nn.Conv2d)]
    return [convs[0].in_channels] + [c.out_channels for c in convs]


def _transform_key(t) -> Tuple:
    return (type(t).__name__, tuple(sorted((k, repr(v)) for k, v in vars(t).items())))


@register_kd_method("CrossKD")
class CrossKD(KDMethod):
    ATTR = "kd_crosskd"
    NEEDS = (FPN, DENSE_HEAD, TEACHER_HEAD)
    STUDENT_FAMILIES = ("retinanet", "fcos")
    TEACHER_FAMILIES = ("retinanet", "fcos")

    def __init__(self, family: str, reused_head_idx: int, student_levels: Sequence[str],
                 teacher_levels: Sequence[str], cut_paths: Sequence[str], teacher_start: int,
                 teacher_act: Optional[int], num_classes: int, cls_weight: float, reg_weight: float,
                 beta: float = 1.0, reg_loss: str = "giou", loss_weight: float = 1.0):
        super().__init__()
        self.family = family
        self.reused_head_idx = int(reused_head_idx)
        self.student_levels = list(student_levels)
        self.teacher_levels = list(teacher_levels)
        self.cut_paths = list(cut_paths)  # (cls, bbox) student module paths; empty for index 0
        self.teacher_start = int(teacher_start)  # first teacher subnet child after the cut's activation
        self.teacher_act = teacher_act  # index of the teacher subnet's activation at the cut (None: index 0)
        self.num_classes = int(num_classes)
        self.cls_weight, self.reg_weight = float(cls_weight), float(reg_weight)
        self.beta, self.reg_loss, self.loss_weight = float(beta), reg_loss, float(loss_weight)

    # ------------------------------------------------------------------ config
    @staticmethod
    def add_config(cfg):
        cfg.KD.CROSSKD = CN()
        # None: the official value of the student's family (FAMILY_DEFAULTS, module docstring).
        cfg.KD.CROSSKD.REUSED_HEAD_IDX = None
        cfg.KD.CROSSKD.CLS_WEIGHT = None
        cfg.KD.CROSSKD.REG_WEIGHT = None
        cfg.KD.CROSSKD.REG_LOSS = None  # "giou" | "iou"
        cfg.KD.CROSSKD.BETA = 1.0
        cfg.KD.CROSSKD.LOSS_WEIGHT = 1.0

    @classmethod
    def resolved(cls, cfg, family: str) -> Dict[str, object]:
        """``KD.CROSSKD`` with each ``None`` replaced by the official value of ``family``."""
        node = cfg.KD.CROSSKD
        out = {k: node.get(k) for k in ("REUSED_HEAD_IDX", "CLS_WEIGHT", "REG_WEIGHT", "REG_LOSS", "BETA",
                                         "LOSS_WEIGHT")}
        for k, v in FAMILY_DEFAULTS[family].items():
            if out[k] is None:
                out[k] = v
        return out

    @classmethod
    def from_config(cls, cfg, pair):
        family = pair.student_family
        if family != pair.teacher_family or family not in FAMILY_DEFAULTS:
            raise ConfigError(f"KD method CrossKD needs a RetinaNet or FCOS student and a teacher of the same "
                              f"family; the student is {family} and the teacher {pair.teacher_family}")
        r = cls.resolved(cfg, family)
        if r["REG_LOSS"] not in REG_LOSSES:
            raise ConfigError(f"unknown KD.CROSSKD.REG_LOSS {r['REG_LOSS']!r}. Valid choices: {', '.join(REG_LOSSES)}")
        s, t = pair.student, pair.teacher
        s_head, t_head = s.head, t.head
        parts = {}
        for branch in ("cls_subnet", "bbox_subnet"):
            parts[branch] = (_act_positions(getattr(s_head, branch)), _act_positions(getattr(t_head, branch)))
        s_acts, t_acts = parts["cls_subnet"]
        n_valid = min(len(s_acts), len(t_acts), len(parts["bbox_subnet"][0]), len(parts["bbox_subnet"][1]))
        idx = r["REUSED_HEAD_IDX"]
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx <= n_valid:
            raise ConfigError(f"KD.CROSSKD.REUSED_HEAD_IDX {idx!r} is out of range: valid 0..{n_valid} (0: the head "
                              f"input; i: after the i-th conv block, before its activation; the student's head has "
                              f"{len(s_acts)} blocks per branch, the teacher's {len(t_acts)})")
        for branch in parts:
            sw = _widths(getattr(s_head, branch))[idx]
            tw = _widths(getattr(t_head, branch))[idx]
            if sw != tw:
                raise ConfigError(f"KD method CrossKD: at KD.CROSSKD.REUSED_HEAD_IDX {idx} the student's head "
                                  f"{branch} has {sw} channels and the teacher's {tw}; the teacher's head can only "
                                  "take student features of its own width")
        for name in ("cls_score", "bbox_pred"):
            so, to = getattr(s_head, name).out_channels, getattr(t_head, name).out_channels
            if so != to:
                raise ConfigError(f"KD method CrossKD: the student's head.{name} has {so} outputs and the "
                                  f"teacher's {to}; they need the same classes and anchors per location")
        if _transform_key(s.box2box_transform) != _transform_key(t.box2box_transform):
            raise ConfigError(f"KD method CrossKD decodes both models' regressions with the student's box "
                              f"transform, but they differ: student {_transform_key(s.box2box_transform)}, "
                              f"teacher {_transform_key(t.box2box_transform)}")
        s_cells = list(getattr(s.anchor_generator, "cell_anchors", []))
        t_cells = list(getattr(t.anchor_generator, "cell_anchors", []))
        # Models checked on the meta device (kd_det.build.validate_kd_model) have no anchor values yet.
        if not any(c.is_meta for c in s_cells + t_cells) and [c.tolist() for c in s_cells] != [c.tolist() for c in t_cells]:
            raise ConfigError("KD method CrossKD decodes the teacher's regressions on the student's anchors, but the "
                              "student's and the teacher's anchor generators differ (MODEL.ANCHOR_GENERATOR)")
        # Levels: the student's head levels, each with the teacher's level of the same stride.
        by_stride = {p[0]: p[2] for p in pair.require_fpn_pairs("CrossKD")}
        shapes = s.backbone.output_shape()
        missing = [f for f in s.head_in_features if shapes[f].stride not in by_stride]
        if missing:
            raise ConfigError(f"KD method CrossKD: the student's head levels {missing} have no teacher FPN level "
                              f"of the same stride ({pair.describe_levels()})")
        t_levels = [by_stride[shapes[f].stride] for f in s.head_in_features]
        if idx == 0:
            cut_paths, teacher_act, start = [], None, 0
        else:
            cut_paths = [f"head.{b}.{parts[b][0][idx - 1] - 1}" for b in ("cls_subnet", "bbox_subnet")]
            if parts["cls_subnet"][1][idx - 1] != parts["bbox_subnet"][1][idx - 1]:
                raise ConfigError("KD method CrossKD: the teacher's cls_subnet and bbox_subnet differ in layout")
            teacher_act = t_acts[idx - 1]
            start = teacher_act + 1
        return cls(family, idx, s.head_in_features, t_levels, cut_paths, start, teacher_act, s.num_classes,
                   r["CLS_WEIGHT"], r["REG_WEIGHT"], r["BETA"], r["REG_LOSS"], r["LOSS_WEIGHT"])

    def student_taps(self) -> Sequence[str]:
        return list(self.cut_paths)

    # ------------------------------------------------------------------ forward
    def _student_cut(self, inputs) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The student's tensors at the cut, per level: (cls branch, bbox branch)."""
        if self.reused_head_idx == 0:
            feats = [inputs.student_fpn[f] for f in self.student_levels]
            return feats, feats
        out = []
        for path in self.cut_paths:
            got = inputs.taps.get(path, [])
            if len(got) != len(self.student_levels):
                raise RuntimeError(f"CrossKD: expected one output of student {path} per head level "
                                   f"({len(self.student_levels)}), recorded {len(got)}")
            out.append(list(got))
        return out[0], out[1]

    @staticmethod
    def _run(subnet: nn.Sequential, x: torch.Tensor, start: int, stop: Optional[int] = None) -> torch.Tensor:
        for m in list(subnet.children())[start:stop]:
            x = m(x)
        return x

    def teacher_pass(self, inputs) -> Dict[str, List[torch.Tensor]]:
        """One pass of the teacher's head under inference mode: its tensors at the cut and its predictions."""
        head = inputs.teacher.head
        cut_stop = None if self.teacher_act is None else self.teacher_act
        out = {"cls_cut": [], "bbox_cut": [], "logits": [], "deltas": []}
        with torch.inference_mode():
            for level in self.teacher_levels:
                x = inputs.teacher_fpn[level]
                for branch, key, pred in (("cls_subnet", "cls", "logits"), ("bbox_subnet", "bbox", "deltas")):
                    subnet = getattr(head, branch)
                    cut = x if cut_stop is None else self._run(subnet, x, 0, cut_stop)
                    y = self._run(subnet, cut, 0 if cut_stop is None else cut_stop)
                    out[f"{key}_cut"].append(cut)
                    out[pred].append(getattr(head, "cls_score" if key == "cls" else "bbox_pred")(y))
        # Inference tensors cannot be saved for backward: clone them outside inference mode.
        return {k: [t.clone() for t in v] for k, v in out.items()}

    def cross_head(self, inputs, teacher: Dict[str, List[torch.Tensor]]
                   ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The student's cut tensors, scale-aligned, through the rest of the teacher's head (autograd on)."""
        head = inputs.teacher.head
        s_cls, s_bbox = self._student_cut(inputs)
        logits, deltas = [], []
        for lvl in range(len(self.student_levels)):
            for branch, s_cut, t_cut, outs, layer in (
                    ("cls_subnet", s_cls, teacher["cls_cut"], logits, head.cls_score),
                    ("bbox_subnet", s_bbox, teacher["bbox_cut"], deltas, head.bbox_pred)):
                subnet = getattr(head, branch)
                x = align_scale(s_cut[lvl], t_cut[lvl])
                if self.teacher_act is not None:
                    x = list(subnet.children())[self.teacher_act](x)
                outs.append(layer(self._run(subnet, x, self.teacher_start)))
        return logits, deltas

    def predictions(self, inputs) -> Dict[str, torch.Tensor]:
        """Flattened ``(M, K)`` / ``(M, 4)`` cross-head and teacher predictions, ``M = N * anchors``."""
        teacher = self.teacher_pass(inputs)
        c_logits, c_deltas = self.cross_head(inputs, teacher)
        k = self.num_classes

        def flat(levels, dim):
            return torch.cat([permute_to_N_HWA_K(x, dim) for x in levels], dim=1).reshape(-1, dim).float()

        return {"cross_logits": flat(c_logits, k), "teacher_logits": flat(teacher["logits"], k),
                "cross_deltas": flat(c_deltas, 4), "teacher_deltas": flat(teacher["deltas"], 4)}

    def forward(self, inputs) -> Dict[str, torch.Tensor]:
        p = self.predictions(inputs)
        student = inputs.student
        normalizer = getattr(student, "loss_normalizer", None)
        if normalizer is None:
            raise RuntimeError("CrossKD: the student has no loss_normalizer; its own losses must run first")
        normalizer = float(normalizer)
        weight = None
        if self.family == "retinanet":
            weight = (torch.stack(inputs.anchor_labels) >= 0).reshape(-1).to(p["cross_logits"].dtype)
        loss_cls = kd_quality_focal_loss(p["cross_logits"], p["teacher_logits"], weight, beta=self.beta,
                                         avg_factor=normalizer)
        anchors = Boxes.cat(inputs.anchors).tensor
        n = p["cross_deltas"].shape[0] // anchors.shape[0]
        anchors = anchors.repeat(n, 1)
        transform = student.box2box_transform
        with torch.no_grad():
            t_boxes = transform.apply_deltas(p["teacher_deltas"], anchors)
            reg_w = p["teacher_logits"].max(dim=1).values.sigmoid()
            if weight is not None:
                reg_w = reg_w * weight
        c_boxes = transform.apply_deltas(p["cross_deltas"], anchors)
        per_box = aligned_iou_loss(c_boxes, t_boxes, self.reg_loss)
        loss_reg = (per_box * reg_w).sum() / (normalizer + _F32_EPS)
        return {"loss_crosskd_cls": self.loss_weight * self.cls_weight * loss_cls,
                "loss_crosskd_reg": self.loss_weight * self.reg_weight * loss_reg}
