"""CWD on FPN levels and, optionally, dense class logits (Shu et al., "Channel-wise Knowledge
Distillation for Dense Prediction", ICCV 2021, arXiv 2011.13256): losses ``loss_cwd``
(features) and ``loss_cwd_logits``.

Each channel of each map becomes a distribution over its positions (softmax at
temperature ``tau``) and the student's is pulled towards the teacher's by KL
divergence: :func:`kd_cls.losses.cwd_loss`. Per-level values are summed, as
mmrazor sums its per-level loss terms.

Features (official source: open-mmlab/mmrazor, commit
90c7af1fdf35a606a2fceaaeb4b6be2f0dac4eb7,
``configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py`` and
``cwd_fpn_retina_r101_retina_r50_1x_coco.py``): every neck output (indices 0-4:
mmdet's R-CNN P2-P6, RetinaNet P3-P7) with ``tau=1`` and ``loss_weight=10`` for
both families, hence ``KD.CWD.TAU`` 1.0 and ``KD.CWD.LOSS_WEIGHT`` 10.0 (FCOS
students take the same value, the dense RetinaNet one). Here levels pair by
stride (:mod:`kd_det.pairing`), which for a same-family pair are those same
five levels.

Class logits (``KD.CWD.LOGITS_WEIGHT``, default 0: off). mmrazor's CWD detection
result on a head is GFL's classification branch: open-mmlab/mmrazor v0.3.1,
commit 2dad24044d7f1dad88f20221f8fc071dd40fdd4f,
``configs/distill/cwd/cwd_cls_head_gfl_r101_fpn_gfl_r50_fpn_1x_coco.py``:
``bbox_head.gfl_cls`` of both models, ``tau=1``, ``loss_weight=5``, one term per
level (``mmrazor/models/distillers/single_teacher.py``, ``compute_distill_loss``),
summed. Hence ``KD.CWD.LOGITS_TAU`` 1.0; set ``LOGITS_WEIGHT`` 5 for that recipe.
Here the maps are the ``(N, A*K, H, W)`` class logits of detectron2's RetinaNet
or FCOS head (``head.cls_score`` per level), so student and teacher must be dense
detectors with the same ``A*K`` (anchors per position times classes: RetinaNet
9 x K, FCOS 1 x K) and levels pair by stride. The need for dense-head outputs is
declared on the instance (``self.NEEDS``) only when the logits term is on, so
R-CNN students keep the feature term alone.

Channels: mmrazor's configs use no connector (256 on both sides).
``KD.CWD.CONNECTOR`` is ``""`` (equal counts required; a one-line error
otherwise), ``"conv1x1"`` or ``"align"`` (see :func:`kd_det.methods.fitnet.fpn_connectors`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from detectron2.config import CfgNode as CN

from kd_cls.config import ConfigError
from kd_cls.losses import cwd_loss

from .base import DENSE_HEAD, FPN, KDMethod, register_kd_method
from .fitnet import check_same_shape, fpn_connectors

__all__ = ["CWDFPN", "head_level_pairs"]

_DENSE = ("retinanet", "fcos")


def _head_strides(model) -> List[int]:
    shapes = model.backbone.output_shape()
    return [shapes[f].stride for f in model.head_in_features]


def head_level_pairs(pair) -> List[Tuple[int, int]]:
    """``[(student head level index, teacher head level index)]`` of the head levels of the same stride."""
    s, t = _head_strides(pair.student), _head_strides(pair.teacher)
    return [(i, t.index(stride)) for i, stride in enumerate(s) if stride in t]


@register_kd_method("CWD")
class CWDFPN(KDMethod):
    NEEDS = (FPN,)

    def __init__(self, pairs: Sequence[Tuple[int, str, str, int, int]], connector: str, tau: float,
                 loss_weight: float, logits_pairs: Sequence[Tuple[int, int]] = (), logits_tau: float = 1.0,
                 logits_weight: float = 0.0):
        super().__init__()
        self.levels = [(s, t) for _, s, t, _, _ in pairs]
        # The softmax over positions ignores a per-channel offset: no bias.
        self.connectors = fpn_connectors(connector, pairs, "CWD", bias=False)
        self.tau, self.loss_weight = tau, loss_weight
        self.logits_pairs = list(logits_pairs) if logits_weight else []
        self.logits_tau, self.logits_weight = logits_tau, logits_weight
        if self.logits_pairs:
            self.NEEDS = (FPN, DENSE_HEAD)  # read by the distiller from the instance

    @staticmethod
    def add_config(cfg):
        cfg.KD.CWD = CN()
        cfg.KD.CWD.LOSS_WEIGHT = 10.0  # mmrazor cwd_fpn_{frcnn,retina}_r101_*_r50_1x_coco.py
        cfg.KD.CWD.TAU = 1.0           # same configs
        cfg.KD.CWD.CONNECTOR = ""
        # Class logits of RetinaNet/FCOS heads; 0 = off. mmrazor v0.3.1's GFL cls-head recipe: 5.
        cfg.KD.CWD.LOGITS_WEIGHT = 0.0
        cfg.KD.CWD.LOGITS_TAU = 1.0    # mmrazor v0.3.1 cwd_cls_head_gfl_r101_fpn_gfl_r50_fpn_1x_coco.py

    @classmethod
    def from_config(cls, cfg, pair):
        c = cfg.KD.CWD
        pairs = pair.require_fpn_pairs("CWD")
        logits_pairs: List[Tuple[int, int]] = []
        if c.LOGITS_WEIGHT:
            sf, tf = pair.student_family, pair.teacher_family
            if sf not in _DENSE or tf not in _DENSE:
                raise ConfigError(f"KD.CWD.LOGITS_WEIGHT {c.LOGITS_WEIGHT} distills dense-head class logits, which "
                                  f"needs RetinaNet/FCOS student and teacher; the student is {sf} and the teacher "
                                  f"{tf} (set it to 0 to distill FPN features only)")
            cs, ct = pair.student.head.cls_score.out_channels, pair.teacher.head.cls_score.out_channels
            if cs != ct:
                raise ConfigError(f"KD.CWD.LOGITS_WEIGHT: the student's head has {cs} class-logit channels "
                                  f"(anchors x classes) and the teacher's {ct}; CWD on logits needs the same "
                                  "anchors per position and classes (set it to 0 to distill FPN features only)")
            logits_pairs = head_level_pairs(pair)
            if not logits_pairs:
                raise ConfigError(f"KD.CWD.LOGITS_WEIGHT: no head level of the same stride in student and teacher: "
                                  f"student {list(pair.student.head_in_features)}, "
                                  f"teacher {list(pair.teacher.head_in_features)}")
        return cls(pairs, c.CONNECTOR, c.TAU, c.LOSS_WEIGHT, logits_pairs, c.LOGITS_TAU, c.LOGITS_WEIGHT)

    def forward(self, inputs):
        total = 0.0
        for (s, t), conn in zip(self.levels, self.connectors):
            fs, ft = conn(inputs.student_fpn[s]), inputs.teacher_fpn[t]
            check_same_shape("CWD", s, fs, ft)
            total = total + cwd_loss(fs, ft, self.tau)
        out = {"loss_cwd": self.loss_weight * total}
        if self.logits_pairs:
            s_logits, t_logits = inputs.student_head[0], inputs.teacher_head[0]
            total = 0.0
            for i, j in self.logits_pairs:
                check_same_shape("CWD logits", f"{i}", s_logits[i], t_logits[j])
                total = total + cwd_loss(s_logits[i], t_logits[j], self.logits_tau)
            out["loss_cwd_logits"] = self.logits_weight * total
        return out
