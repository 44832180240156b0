"""Variational information distillation (Ahn et al., arXiv 1904.05835), on every stage output after the stem.

For each stage, a regressor (three 1x1 convs with ReLUs) predicts the
teacher's map from the student's (the larger pooled to the smaller's size);
the loss is the Gaussian negative log-likelihood with a learned per-channel
variance ``softplus(log_scale) + EPS``, initialised to ``INIT_PRED_VAR``.

The variances are registered and trained here, as the paper intends.
mdistiller creates them but never registers, trains or saves them (they stay
at their initial value), so ``get_extra_parameters()`` counts the regressors
alone, like mdistiller; ``extra_parameter_notes()`` reports the variances.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_cls.losses import match_spatial, vid_loss
from kd_cls.nn.connectors import conv1x1

from ._feature_common import feature_pair_shapes, model_taps
from .base import Distiller, count_params, register_distiller



@register_distiller("VID")
class VID(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.VID = CN()
        cfg.VID.LOSS = CN()
        cfg.VID.LOSS.CE_WEIGHT = 1.0
        cfg.VID.LOSS.FEAT_WEIGHT = 1.0
        cfg.VID.EPS = 1e-5
        cfg.VID.INIT_PRED_VAR = 5.0
        cfg.VID.INPUT_SIZE = (32, 32)

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.ce_loss_weight = cfg.VID.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.VID.LOSS.FEAT_WEIGHT
        self.eps = cfg.VID.EPS
        init_var = cfg.VID.INIT_PRED_VAR
        if init_var <= self.eps:
            raise ValueError(f"VID.INIT_PRED_VAR must exceed VID.EPS={self.eps}; got {init_var}")
        s_taps = list(model_taps(student, "feats", "VID")[1:])
        t_taps = list(model_taps(teacher, "feats", "VID")[1:])
        n = min(len(s_taps), len(t_taps))
        self.s_taps, self.t_taps = s_taps[:n], t_taps[:n]
        s_shapes, t_shapes = feature_pair_shapes(student, teacher, self.s_taps, self.t_taps, cfg.VID.INPUT_SIZE)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        # softplus^-1(init_var - eps), so that the initial variance is init_var
        init_log_scale = math.log(math.expm1(init_var - self.eps))
        for s_shape, t_shape in zip(s_shapes, t_shapes):
            c_s, c_t = s_shape[1], t_shape[1]
            self.regressors.append(
                nn.Sequential(conv1x1(c_s, c_t), nn.ReLU(), conv1x1(c_t, c_t), nn.ReLU(), conv1x1(c_t, c_t))
            )
            self.log_scales.append(nn.Parameter(torch.full((c_t,), init_log_scale)))

    def extra_modules(self):
        return [self.regressors, self.log_scales]

    def get_extra_parameters(self) -> int:
        return count_params(self.regressors.parameters())

    def extra_parameter_notes(self):
        n = count_params(self.log_scales.parameters())
        return [f"VID variances: {n} learned parameters, not counted above (mdistiller never registers or trains them)"]

    def forward_train(self, image, target, **kwargs):
        logits_s, g_s = self.run_student(image, self.s_taps)
        _, g_t = self.run_teacher(image, self.t_taps)
        loss = 0.0
        for regressor, log_scale, f_s, f_t in zip(self.regressors, self.log_scales, g_s, g_t):
            f_s, f_t = match_spatial(f_s, f_t)
            loss = loss + vid_loss(regressor(f_s), f_t, log_scale, self.eps)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * loss,
        }
