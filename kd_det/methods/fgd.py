"""FGD over FPN levels (Yang et al., "Focal and Global Knowledge Distillation for Detectors",
CVPR 2022, arXiv 2111.11837): loss ``loss_fgd``.

What is distilled: every FPN level the student and the teacher share (paired by
stride, see :mod:`kd_det.pairing`). Per level, :class:`kd_cls.losses.FGDLoss`
(the official ``FeatureLoss``) compares the student's map with the teacher's:
focal terms (squared differences weighted by the teacher's spatial and channel
attention, split into a ground-truth-box foreground and a background), an
attention-imitation term and a global (GCNet context) relation term. A 1x1
``align`` conv maps the student's channels to the teacher's only when they
differ. The GT boxes are ``inputs.gt_instances[i].gt_boxes`` in input pixels and
the sizes they refer to are ``inputs.image_sizes`` (the unpadded, resized image,
the official ``img_metas[i]['img_shape']``); an image without boxes is all
background. ``loss_fgd`` is the sum of the per-level losses (the official
distiller returns one ``loss_fgd_fpn_<i>`` per level, and mmdet sums every
loss), times ``KD.FGD.LOSS_WEIGHT``.

Keys ``KD.FGD.{TEMP, ALPHA, BETA, GAMMA, LAMBDA}``: ``None`` takes the value of
the student's family from ``FAMILY_DEFAULTS``, read from yzd-v/FGD at commit
c03a6cf3b3cb3cbfd5554dbf4766e7135747d22d, ``configs/distillers/fgd/``:

* ``retinanet``: temp 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6
  (``fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py``; the same in
  both ``fgd_retina_rx101_64x4d_*`` files);
* ``rcnn``: temp 0.5, alpha 5e-5, beta 2.5e-5, gamma 5e-5, lambda 5e-7
  (``fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py``; the
  same in ``fgd_mask_rcnn_r101_fpn_distill_mask_rcnn_r50_fpn_2x_coco.py`` and
  the ``fgd_cascade_mask_rcnn_rx101_32x4d_*`` files);
* ``fcos``: temp 0.8, alpha 1.6e-3, beta 8e-4, gamma 8e-4, lambda 8e-6
  (``fgd_fcos_r101_distill_fcos_r50_2x_coco.py``);
* ``other`` (no official recipe): the RetinaNet values, the repository's
  single-stage dense-detector recipe (also GFL's, ``fgd_gfl_r101_*``).

The family is the student's: the weights scale a feature loss against the
student's own detection losses. ``KD.FGD.LOSS_WEIGHT`` (1.0) multiplies the sum.

Levels: the official configs hook ``neck.fpn_convs.<i>.conv`` of mmdet's FPN,
so RetinaNet and FCOS distill all five levels (P3-P7, ``fpn_convs.0-4``) and
Faster/Mask R-CNN four (P2-P5, ``fpn_convs.0-3``; mmdet's P6 there is a
max-pool, not a conv, so no hook sees it). Here every stride-paired level is
distilled: five for R-CNN (p2-p6, detectron2's p6 is also a max-pool of p5),
four for an R-CNN/RetinaNet or R-CNN/FCOS pair (p3-p6).

Parameters: the per-level losses are ``kd_fgd.losses.<i>``, ``i`` counting
paired levels from the finest, each with the official ``FeatureLoss`` key names
(``conv_mask_s``, ``conv_mask_t``, ``channel_add_conv_s``,
``channel_add_conv_t``, ``align`` when present). So ``distill_losses.
loss_fgd_fpn_<i>.*`` of an official checkpoint is ``kd_fgd.losses.<i>.*`` here
for the same level order (``fpn_0`` is the finest level in both).
"""
from __future__ import annotations

import numbers
from typing import Dict, Sequence, Tuple

from detectron2.config import CfgNode as CN
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.losses import FGDLoss

from .base import FPN, KDMethod, register_kd_method

__all__ = ["FGDFPN", "FAMILY_DEFAULTS", "resolve_fgd_values"]

_KEYS = ("TEMP", "ALPHA", "BETA", "GAMMA", "LAMBDA")

# {family: (temp, alpha, beta, gamma, lambda)}; sources in the module docstring.
FAMILY_DEFAULTS: Dict[str, Tuple[float, float, float, float, float]] = {
    "retinanet": (0.5, 1e-3, 5e-4, 5e-4, 5e-6),
    "rcnn": (0.5, 5e-5, 2.5e-5, 5e-5, 5e-7),
    "fcos": (0.8, 1.6e-3, 8e-4, 8e-4, 8e-6),
}
FAMILY_DEFAULTS["other"] = FAMILY_DEFAULTS["retinanet"]


def resolve_fgd_values(node, family: str) -> Dict[str, float]:
    """``KD.FGD`` -> ``{key: value}`` for the five hyperparameters, ``None`` taken from ``family``'s row."""
    row = dict(zip(_KEYS, FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["other"])))
    out = {}
    for key in _KEYS:
        value = node[key]
        if value is None:
            value = row[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"KD.FGD.{key} must be a number or None (the {family} default {row[key]}), "
                              f"got {value!r}")
        if key == "TEMP" and not value > 0:
            raise ConfigError(f"KD.FGD.TEMP must be > 0 (a softmax temperature), got {value}")
        if key != "TEMP" and value < 0:
            raise ConfigError(f"KD.FGD.{key} must be >= 0 (a loss weight), got {value}")
        out[key] = float(value)
    return out


@register_kd_method("FGD")
class FGDFPN(KDMethod):
    NEEDS = (FPN,)

    def __init__(self, fpn_pairs: Sequence[Tuple[int, str, str, int, int]], temp: float, alpha: float,
                 beta: float, gamma: float, lambda_: float, loss_weight: float = 1.0):
        super().__init__()
        self.levels = [(p[1], p[2]) for p in fpn_pairs]
        self.loss_weight = loss_weight
        self.losses = nn.ModuleList(
            FGDLoss(cs, ct, temp=temp, alpha=alpha, beta=beta, gamma=gamma, lambda_=lambda_)
            for _, _, _, cs, ct in fpn_pairs
        )

    @staticmethod
    def add_config(cfg):
        cfg.KD.FGD = CN()
        cfg.KD.FGD.LOSS_WEIGHT = 1.0
        # None: the student family's official value (kd_det/methods/fgd.py, FAMILY_DEFAULTS).
        cfg.KD.FGD.TEMP = None
        cfg.KD.FGD.ALPHA = None  # foreground
        cfg.KD.FGD.BETA = None  # background
        cfg.KD.FGD.GAMMA = None  # attention
        cfg.KD.FGD.LAMBDA = None  # global relation

    @classmethod
    def from_config(cls, cfg, pair):
        pairs = pair.require_fpn_pairs("FGD")
        v = resolve_fgd_values(cfg.KD.FGD, pair.student_family)
        return cls(pairs, v["TEMP"], v["ALPHA"], v["BETA"], v["GAMMA"], v["LAMBDA"], cfg.KD.FGD.LOSS_WEIGHT)

    def forward(self, inputs):
        boxes = [inst.gt_boxes.tensor for inst in inputs.gt_instances]
        sizes = inputs.image_sizes
        total = 0.0
        for (s_level, t_level), loss in zip(self.levels, self.losses):
            fs, ft = inputs.student_fpn[s_level], inputs.teacher_fpn[t_level]
            if fs.shape[-2:] != ft.shape[-2:]:
                raise ValueError(
                    f"FGD level {s_level}: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}; "
                    "teacher and student must see the same padded image size"
                )
            total = total + loss(fs, ft, boxes, sizes)
        return {"loss_fgd": self.loss_weight * total}
