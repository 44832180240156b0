"""ReviewKD over FPN levels (Chen et al., CVPR 2021, arXiv 2104.09044): loss ``loss_reviewkd``.

Attention-based fusion modules (:class:`kd_cls.nn.connectors.ABF`, shared with the
classification frontend) run from the coarsest student level to the finest;
each maps its level to the teacher's channel count while fusing the residual of
the coarser level, upsampled to the level's own (non-square) size. The outputs
are compared with the teacher's levels by :func:`kd_cls.losses.hcl_loss`, times
``KD.REVIEWKD.LOSS_WEIGHT``.
Channels come from the built models' ``backbone.output_shape()``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.nn.connectors import ABF
from kd_cls.losses import hcl_loss
from .base import KDInputs, register_kd_method


@register_kd_method("ReviewKD")
class ReviewKDFPN(nn.Module):
    ATTR = "kd_trans"
    NEEDS_ROI_LOGITS = False

    def __init__(self, levels: Sequence[str], in_channels: Sequence[int], out_channels: Sequence[int], mid_channels: int, loss_weight: float):
        super().__init__()
        self.levels = list(levels)
        self.loss_weight = loss_weight
        n = len(self.levels)
        # abfs[0] serves the coarsest level (no residual to fuse), abfs[-1] the finest.
        self.abfs = nn.ModuleList(
            ABF(in_channels[i], mid_channels, out_channels[i], fuse=i < n - 1) for i in reversed(range(n))
        )

    @classmethod
    def from_models(cls, cfg, student, teacher):
        s_shape = student.backbone.output_shape()
        t_shape = teacher.backbone.output_shape()
        s_levels = sorted(s_shape, key=lambda k: s_shape[k].stride)
        t_levels = sorted(t_shape, key=lambda k: t_shape[k].stride)
        s_strides = [s_shape[k].stride for k in s_levels]
        t_strides = [t_shape[k].stride for k in t_levels]
        if s_levels != t_levels or s_strides != t_strides:
            raise ConfigError(
                f"ReviewKD pairs FPN levels by name and stride: student has {dict(zip(s_levels, s_strides))}, "
                f"teacher has {dict(zip(t_levels, t_strides))}"
            )
        in_ch = [s_shape[k].channels for k in s_levels]
        out_ch = [t_shape[k].channels for k in t_levels]
        r = cfg.KD.REVIEWKD
        for key, declared, built, who in (("IN_CHANNELS", r.IN_CHANNELS, in_ch, "student"), ("OUT_CHANNELS", r.OUT_CHANNELS, out_ch, "teacher")):
            if len(declared) and list(declared) != built:
                raise ConfigError(
                    f"FPN channel mismatch: KD.REVIEWKD.{key} {list(declared)} but the {who}'s FPN levels "
                    f"{s_levels} have channels {built} (leave it empty to use the model's)"
                )
        mid = r.MID_CHANNELS or in_ch[0]
        return cls(s_levels, in_ch, out_ch, mid, r.LOSS_WEIGHT)

    def fuse(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Student levels, finest first -> fused levels with the teacher's channels, finest first."""
        coarse_first = list(features)[::-1]
        out, residual = self.abfs[0](coarse_first[0])
        results = [out]
        for x, abf in zip(coarse_first[1:], self.abfs[1:]):
            out, residual = abf(x, residual)
            results.append(out)
        return results[::-1]

    def forward(self, inputs: KDInputs):
        fused = self.fuse([inputs.student_features[k] for k in self.levels])
        teacher = [inputs.teacher_features[k] for k in self.levels]
        for k, fs, ft in zip(self.levels, fused, teacher):
            if fs.shape != ft.shape:
                raise ValueError(
                    f"ReviewKD level {k}: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}; "
                    "teacher and student must see the same padded image size"
                )
        return {"loss_reviewkd": hcl_loss(fused, teacher) * self.loss_weight}
