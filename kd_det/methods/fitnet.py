"""FitNet on FPN levels (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv 1412.6550):
loss ``loss_fitnet``.

Each paired student FPN level goes through a learnable 1x1 convolution (the
"regressor" of the hint, one per level) and is compared with the teacher's level
of the same stride by the mean squared error; the per-level values are summed
and multiplied by ``KD.FITNET.LOSS_WEIGHT``. This is the detection FitNet
baseline that the DKD paper (Zhao et al., CVPR 2022, arXiv 2203.08679) and the
ReviewKD paper (Chen et al., CVPR 2021, arXiv 2104.09044) list on COCO.

Sources. Neither of those papers' code releases holds a detection FitNet:
megvii-research/mdistiller (commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``detection/``) and dvlab-research/ReviewKD (commit
cede6ea6387ae9b6127de0e561507177bf19c11e, ``Detection/``) ship ReviewKD and DKD
only, and megvii-research/ICD (commit acf27269648e4538a9d6d22171d1abbcd4eceed1,
``pytorch_release/``) ships ICD only. There is no official detection FitNet
config, so the defaults are this toolkit's choices:

* ``LOSS_WEIGHT`` 1.0;
* ``CONNECTOR`` ``"conv1x1"``: a 1x1 convolution with bias at every level, also
  when the channel counts are equal, as FitNets' regressor always exists (and as
  the third-party detection FitNet of LutingWang/HEAD, commit
  1179b7803f9a2ca0c6e7df13ca2733ed6d13f317, ``configs/kd/fitnet_r18_faster.py``:
  a 256 -> 256 1x1 ``Conv2d`` per level, MSE, weight 1.0). ``"align"`` keeps the
  convolution only where the counts differ (the ``align`` rule of the official
  FGD/MGD code, :class:`kd_cls.nn.connectors.ChannelAlign`); with equal counts
  it is plain MSE between the FPN maps. ``""``: no connector (equal counts only).

Any detector family with an FPN: levels pair by stride (R-CNN p2-p6, RetinaNet
and FCOS p3-p7; see :mod:`kd_det.pairing`), so every level both share is
distilled and no map is resized.

:func:`fpn_connectors` (the ``CONNECTOR`` rule) is shared with PKD and CWD.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.nn.connectors import ChannelAlign, conv1x1

from .base import FPN, KDMethod, register_kd_method

__all__ = ["FitNetFPN", "CONNECTORS", "fpn_connectors", "check_same_shape"]

# What a method's CONNECTOR key accepts: "" (none), "conv1x1" (every level), "align" (only where counts differ).
CONNECTORS = ("", "conv1x1", "align")


def fpn_connectors(kind: str, pairs: Sequence[Tuple[int, str, str, int, int]], method: str,
                   bias: bool = True) -> nn.ModuleList:
    """One student -> teacher connector per paired level (``KD.<METHOD>.CONNECTOR``); one-line ConfigErrors."""
    key = f"KD.{method.upper()}.CONNECTOR"
    if kind not in CONNECTORS:
        raise ConfigError(f"unknown {key} {kind!r}. Valid choices: '' (none), conv1x1, align")
    if kind == "":
        for _, s, t, cs, ct in pairs:
            if cs != ct:
                raise ConfigError(f"{method}: the student's {s} has {cs} channels and the teacher's {t} {ct}; "
                                  f"set {key} to conv1x1 or align to map them")
        return nn.ModuleList(nn.Identity() for _ in pairs)
    if kind == "align":
        return nn.ModuleList(ChannelAlign(cs, ct) for _, _, _, cs, ct in pairs)
    return nn.ModuleList(conv1x1(cs, ct, bias=bias) for _, _, _, cs, ct in pairs)


def check_same_shape(method: str, level: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{method} level {level}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
                         "teacher and student must see the same padded image size")


@register_kd_method("FitNet")
class FitNetFPN(KDMethod):
    NEEDS = (FPN,)

    def __init__(self, pairs: Sequence[Tuple[int, str, str, int, int]], connector: str, loss_weight: float):
        super().__init__()
        self.levels = [(s, t) for _, s, t, _, _ in pairs]
        self.connectors = fpn_connectors(connector, pairs, "FitNet", bias=True)
        self.loss_weight = loss_weight

    @staticmethod
    def add_config(cfg):
        cfg.KD.FITNET = CN()
        cfg.KD.FITNET.LOSS_WEIGHT = 1.0  # no official detection FitNet config: this toolkit's choice
        cfg.KD.FITNET.CONNECTOR = "conv1x1"

    @classmethod
    def from_config(cls, cfg, pair):
        f = cfg.KD.FITNET
        return cls(pair.require_fpn_pairs("FitNet"), f.CONNECTOR, f.LOSS_WEIGHT)

    def forward(self, inputs):
        total = 0.0
        for (s, t), conn in zip(self.levels, self.connectors):
            fs, ft = conn(inputs.student_fpn[s]), inputs.teacher_fpn[t]
            check_same_shape("FitNet", s, fs, ft)
            total = total + F.mse_loss(fs, ft)
        return {"loss_fitnet": self.loss_weight * total}
