"""ReviewKD over FPN levels (Chen et al., CVPR 2021, arXiv 2104.09044): loss ``loss_reviewkd``.

Attention-based fusion modules (:class:`kd_cls.nn.connectors.ABF`, shared with
the classification frontend) run from the coarsest paired student level to the
finest; each maps its level to the teacher's channel count while fusing the
residual of the coarser level, upsampled to the level's own (non-square) size.
The outputs are compared with the teacher's levels of the same stride by
:func:`kd_cls.losses.hcl_loss`, times ``KD.REVIEWKD.LOSS_WEIGHT``. Any detector
family: the levels are those student and teacher share (see
:mod:`kd_det.pairing`); channels come from the built models.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from detectron2.config import CfgNode as CN

from kd_cls.config import ConfigError
from kd_cls.losses import hcl_loss
from kd_cls.nn.connectors import ABF
from torch import nn

from .base import FPN, KDMethod, register_kd_method


@register_kd_method("ReviewKD")
class ReviewKDFPN(KDMethod):
    ATTR = "kd_trans"  # mdistiller's name: its checkpoints hold the fusion modules under kd_trans.
    NEEDS = (FPN,)

    def __init__(self, student_levels: Sequence[str], teacher_levels: Sequence[str], in_channels: Sequence[int],
                 out_channels: Sequence[int], mid_channels: int, loss_weight: float):
        super().__init__()
        self.levels = list(student_levels)
        self.teacher_levels = list(teacher_levels)
        self.loss_weight = loss_weight
        n = len(self.levels)
        # abfs[0] serves the coarsest level (no residual to fuse), abfs[-1] the finest.
        self.abfs = nn.ModuleList(
            ABF(in_channels[i], mid_channels, out_channels[i], fuse=i < n - 1) for i in reversed(range(n))
        )

    @staticmethod
    def add_config(cfg):
        cfg.KD.REVIEWKD = CN()
        cfg.KD.REVIEWKD.LOSS_WEIGHT = 1.0
        # ABF width; 0 takes the student's FPN channel count.
        cfg.KD.REVIEWKD.MID_CHANNELS = 0
        # Per-level channels of student / teacher FPN. Empty: read from the built
        # models. If set, they must match the models (a guard for copied configs).
        cfg.KD.REVIEWKD.IN_CHANNELS = []
        cfg.KD.REVIEWKD.OUT_CHANNELS = []

    @classmethod
    def from_config(cls, cfg, pair):
        pairs = pair.require_fpn_pairs("ReviewKD")
        s_levels, t_levels = [p[1] for p in pairs], [p[2] for p in pairs]
        in_ch, out_ch = [p[3] for p in pairs], [p[4] for p in pairs]
        r = cfg.KD.REVIEWKD
        for key, declared, built, who in (("IN_CHANNELS", r.IN_CHANNELS, in_ch, "student"),
                                          ("OUT_CHANNELS", r.OUT_CHANNELS, out_ch, "teacher")):
            if len(declared) and list(declared) != built:
                raise ConfigError(
                    f"FPN channel mismatch: KD.REVIEWKD.{key} {list(declared)} but the {who}'s paired FPN levels "
                    f"{s_levels if who == 'student' else t_levels} have channels {built} "
                    "(leave it empty to use the model's)"
                )
        mid = r.MID_CHANNELS or in_ch[0]
        return cls(s_levels, t_levels, in_ch, out_ch, mid, r.LOSS_WEIGHT)

    def fuse(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Student levels, finest first -> fused levels with the teacher's channels, finest first."""
        coarse_first = list(features)[::-1]
        out, residual = self.abfs[0](coarse_first[0])
        results = [out]
        for x, abf in zip(coarse_first[1:], self.abfs[1:]):
            out, residual = abf(x, residual)
            results.append(out)
        return results[::-1]

    def forward(self, inputs):
        fused = self.fuse([inputs.student_fpn[k] for k in self.levels])
        teacher = [inputs.teacher_fpn[k] for k in self.teacher_levels]
        for k, fs, ft in zip(self.levels, fused, teacher):
            if fs.shape != ft.shape:
                raise ValueError(
                    f"ReviewKD level {k}: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}; "
                    "teacher and student must see the same padded image size"
                )
        return {"loss_reviewkd": hcl_loss(fused, teacher) * self.loss_weight}
