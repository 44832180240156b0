"""PKD on FPN levels (Cao et al., "PKD: General Distillation Framework for Object Detectors via
Pearson Correlation Coefficient", NeurIPS 2022, arXiv 2207.02039): loss ``loss_pkd``.

Each paired level adds :func:`kd_cls.losses.pkd_loss` (half the MSE of the two
maps standardised per channel over batch and space, i.e. one minus their Pearson
coefficient), times ``KD.PKD.LOSS_WEIGHT``; the levels are summed, as mmrazor
sums its per-level ``loss_pkd_fpn<i>`` terms.

Official source: open-mmlab/mmrazor, commit
90c7af1fdf35a606a2fceaaeb4b6be2f0dac4eb7, ``configs/distill/mmdet/pkd/``:

=================================================  =========  ==========  ======
config                                             teacher    student     weight
=================================================  =========  ==========  ======
pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco   R-CNN      R-CNN       6
pkd_fpn_mask-rcnn_swin_retina_r50_2x_coco          R-CNN      RetinaNet   6
pkd_fpn_retina_x101_retina_r50_2x_coco             RetinaNet  RetinaNet   10
pkd_fpn_fcos_x101_retina_r50_1x_coco               FCOS       RetinaNet   10
pkd_fpn_reppoints_x101-dcn_reppoints_r50_2x_coco   RepPoints  RepPoints   10
=================================================  =========  ==========  ======

The weight follows the *teacher's* family in all five (a RetinaNet student takes
6 from the Mask R-CNN teacher), so ``LOSS_WEIGHT: None`` resolves from the
teacher's family: ``rcnn`` 6, ``retinanet`` / ``fcos`` 10 (FCOS: the dense
configs' value), ``other`` 6 (the base R-CNN config's value, which the dense
configs override). A dense teacher with an R-CNN student has no official config
and takes 10 by that rule.

Levels. mmrazor distills neck outputs 0-3 by index (mmdet's R-CNN P2-P5,
RetinaNet P3-P6). Here the levels pair by stride (R-CNN p2-p6, RetinaNet/FCOS
p3-p7, :mod:`kd_det.pairing`); ``KD.PKD.LEVELS: []`` distills every paired level,
a list of the student's level names (``["p2", "p3", "p4", "p5"]``) only those.
Spatial sizes then agree, so ``pkd_loss`` never resizes.

Channels: mmrazor's PKD configs use no connector (256 channels on both sides).
``KD.PKD.CONNECTOR`` is ``""`` (equal counts required; a one-line error
otherwise), ``"conv1x1"`` or ``"align"`` (see :func:`kd_det.methods.fitnet.fpn_connectors`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from detectron2.config import CfgNode as CN

from kd_cls.config import ConfigError
from kd_cls.losses import pkd_loss

from .base import FPN, KDMethod, register_kd_method
from .fitnet import check_same_shape, fpn_connectors

__all__ = ["PKDFPN", "PKD_WEIGHT_BY_TEACHER", "select_levels"]

# LOSS_WEIGHT by the teacher's family (mmrazor configs/distill/mmdet/pkd/*, see the module docstring).
PKD_WEIGHT_BY_TEACHER: Dict[str, float] = {
    # pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py and pkd_fpn_mask-rcnn_swin_retina_r50_2x_coco.py
    "rcnn": 6.0,
    "retinanet": 10.0,  # pkd_fpn_retina_x101_retina_r50_2x_coco.py
    "fcos": 10.0,       # pkd_fpn_fcos_x101_retina_r50_1x_coco.py
    "other": 6.0,       # the base config's value (pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py)
}


def select_levels(pairs: Sequence[Tuple[int, str, str, int, int]], levels: Sequence[str],
                  key: str) -> list:
    """The pairs whose student level is in ``levels`` (all of them when empty); one-line error for unknown names."""
    if not levels:
        return list(pairs)
    names = [p[1] for p in pairs]
    bad = [lv for lv in levels if lv not in names]
    if bad:
        raise ConfigError(f"{key} {list(levels)}: {bad[0]!r} is not a paired student FPN level; "
                          f"valid: {', '.join(names)}")
    return [p for p in pairs if p[1] in set(levels)]


@register_kd_method("PKD")
class PKDFPN(KDMethod):
    NEEDS = (FPN,)

    def __init__(self, pairs: Sequence[Tuple[int, str, str, int, int]], connector: str, loss_weight: float):
        super().__init__()
        self.levels = [(s, t) for _, s, t, _, _ in pairs]
        # The standardisation removes any per-channel offset: no bias.
        self.connectors = fpn_connectors(connector, pairs, "PKD", bias=False)
        self.loss_weight = loss_weight

    @staticmethod
    def add_config(cfg):
        cfg.KD.PKD = CN()
        # None: by the teacher's family, PKD_WEIGHT_BY_TEACHER (rcnn 6, retinanet/fcos 10).
        cfg.KD.PKD.LOSS_WEIGHT = None
        # Student level names to distill; [] = every level paired by stride (mmrazor: indices 0-3).
        cfg.KD.PKD.LEVELS = []
        cfg.KD.PKD.CONNECTOR = ""

    @staticmethod
    def resolve_weight(weight: Optional[float], teacher_family: str) -> float:
        return float(PKD_WEIGHT_BY_TEACHER[teacher_family] if weight is None else weight)

    @classmethod
    def from_config(cls, cfg, pair):
        p = cfg.KD.PKD
        pairs = select_levels(pair.require_fpn_pairs("PKD"), list(p.LEVELS), "KD.PKD.LEVELS")
        return cls(pairs, p.CONNECTOR, cls.resolve_weight(p.LOSS_WEIGHT, pair.teacher_family))

    def forward(self, inputs):
        total = 0.0
        for (s, t), conn in zip(self.levels, self.connectors):
            fs, ft = conn(inputs.student_fpn[s]), inputs.teacher_fpn[t]
            check_same_shape("PKD", s, fs, ft)
            total = total + pkd_loss(fs, ft)
        return {"loss_pkd": self.loss_weight * total}
