"""MGD over FPN levels (Yang et al., "Masked Generative Distillation", ECCV 2022, arXiv 2205.01529):
loss ``loss_mgd``.

What is distilled: every FPN level the student and the teacher share (paired by
stride, see :mod:`kd_det.pairing`). Per level, :class:`kd_cls.losses.MGDLoss`
(the official detection ``FeatureLoss``) zeroes a random ``LAMBDA`` fraction of
the (aligned) student map's positions and asks a two-layer 3x3 conv generator
to rebuild the teacher's full map from the rest; summed squared error per
image, times ``ALPHA``. A 1x1 ``align`` conv maps the student's channels to the
teacher's only when they differ. ``loss_mgd`` is the sum over levels (the
official distiller returns one ``loss_mgd_fpn_<i>`` per level and mmdet sums
them), times ``KD.MGD.LOSS_WEIGHT``.

Keys ``KD.MGD.{ALPHA, LAMBDA}``: ``None`` takes the value of the student's
family from ``FAMILY_DEFAULTS``, read from yzd-v/MGD at commit
2c9da0b28625eb948db57afc02c824452c3910fe, ``det/configs/distillers/mgd/``:

* ``retinanet``: alpha 2e-5, lambda 0.65
  (``retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py``; also the
  ``FeatureLoss`` defaults in ``det/mmdet/distillation/losses/mgd.py``);
* ``rcnn``: alpha 5e-7, lambda 0.45
  (``cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py`` and
  ``cascade_mask_rcnn_rx101_32x4d_distill_mask_rcnn_r50_fpn_2x_coco.py``);
* ``fcos`` and ``other``: MGD has no recipe for them; they take the RetinaNet
  values, the closest family (a single-stage dense detector on P3-P7).

``KD.MGD.LOSS_WEIGHT`` (1.0) multiplies the sum.

Levels: the official configs hook ``neck.fpn_convs.<i>.conv`` of mmdet's FPN:
all five levels for RetinaNet (P3-P7), four for Faster/Mask R-CNN (P2-P5;
mmdet's P6 there is a max-pool with no conv to hook). Here every stride-paired
level is distilled: five for R-CNN (p2-p6), four for an R-CNN/dense pair (p3-p6).

Randomness: the masks are drawn as officially, ``torch.rand((N, 1, H, W))``
from the default CPU generator and then moved to the features' device, one
draw per level, nothing else. Levels are visited coarsest first, the order in
which the official ``distill_cfg`` lists them (``fpn_4`` ... ``fpn_0``), so the
draws follow the same sequence.

Parameters: the per-level losses are ``kd_mgd.losses.<i>``, ``i`` counting
paired levels from the finest (the official ``fpn_<i>`` order), with the
official key names (``generation.0``, ``generation.2``, ``align`` when present).
"""
from __future__ import annotations

import numbers
from typing import Dict, Sequence, Tuple

from detectron2.config import CfgNode as CN
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.losses import MGDLoss

from .base import FPN, KDMethod, register_kd_method

__all__ = ["MGDFPN", "FAMILY_DEFAULTS", "resolve_mgd_values"]

# {family: (alpha, lambda)}; sources in the module docstring.
FAMILY_DEFAULTS: Dict[str, Tuple[float, float]] = {
    "retinanet": (2e-5, 0.65),
    "rcnn": (5e-7, 0.45),
}
FAMILY_DEFAULTS["fcos"] = FAMILY_DEFAULTS["retinanet"]
FAMILY_DEFAULTS["other"] = FAMILY_DEFAULTS["retinanet"]


def resolve_mgd_values(node, family: str) -> Dict[str, float]:
    """``KD.MGD`` -> ``{"ALPHA": ..., "LAMBDA": ...}``, ``None`` taken from ``family``'s row."""
    row = dict(zip(("ALPHA", "LAMBDA"), FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["other"])))
    out = {}
    for key in ("ALPHA", "LAMBDA"):
        value = node[key]
        if value is None:
            value = row[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"KD.MGD.{key} must be a number or None (the {family} default {row[key]}), "
                              f"got {value!r}")
        if key == "LAMBDA" and not 0 <= value <= 1:
            raise ConfigError(f"KD.MGD.LAMBDA must be in [0, 1] (the fraction of masked positions), got {value}")
        if key == "ALPHA" and value < 0:
            raise ConfigError(f"KD.MGD.ALPHA must be >= 0 (a loss weight), got {value}")
        out[key] = float(value)
    return out


@register_kd_method("MGD")
class MGDFPN(KDMethod):
    NEEDS = (FPN,)

    def __init__(self, fpn_pairs: Sequence[Tuple[int, str, str, int, int]], alpha: float, lambda_: float,
                 loss_weight: float = 1.0):
        super().__init__()
        self.levels = [(p[1], p[2]) for p in fpn_pairs]
        self.loss_weight = loss_weight
        self.losses = nn.ModuleList(MGDLoss(cs, ct, alpha=alpha, lambda_=lambda_) for _, _, _, cs, ct in fpn_pairs)

    @staticmethod
    def add_config(cfg):
        cfg.KD.MGD = CN()
        cfg.KD.MGD.LOSS_WEIGHT = 1.0
        # None: the student family's official value (kd_det/methods/mgd.py, FAMILY_DEFAULTS).
        cfg.KD.MGD.ALPHA = None  # loss weight
        cfg.KD.MGD.LAMBDA = None  # masked fraction

    @classmethod
    def from_config(cls, cfg, pair):
        pairs = pair.require_fpn_pairs("MGD")
        v = resolve_mgd_values(cfg.KD.MGD, pair.student_family)
        return cls(pairs, v["ALPHA"], v["LAMBDA"], cfg.KD.MGD.LOSS_WEIGHT)

    def forward(self, inputs):
        total = 0.0
        # Coarsest level first: the official distill_cfg order, hence its sequence of mask draws.
        for (s_level, t_level), loss in reversed(list(zip(self.levels, self.losses))):
            fs, ft = inputs.student_fpn[s_level], inputs.teacher_fpn[t_level]
            if fs.shape[-2:] != ft.shape[-2:]:
                raise ValueError(
                    f"MGD level {s_level}: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}; "
                    "teacher and student must see the same padded image size"
                )
            total = total + loss(fs, ft)
        return {"loss_mgd": self.loss_weight * total}
