"""Overhaul of feature distillation (Heo et al., arXiv 1904.01866).

Each student pre-activation stage map (after the stem) passes through a
connector (conv + BN, to the teacher's channels) and is compared with the
teacher's pre-activation map, pooled to the student's size, by OFD's partial
L2 (:func:`kd_cls.losses.ofd_loss`). Deeper stages weigh more: stage ``i`` of
``n`` is divided by ``2**(n - 1 - i)``. When the models have different stage
counts, the last stages are paired.

The margins come from the teacher's BN layers before each stage's final ReLU
(``teacher.get_bn_before_relu()``), read from the registered teacher, never
from its BN-folded inference copy. Unlike mdistiller, which switches the
teacher to train mode for this method (so its BN statistics drift and its
features use batch statistics), the teacher here stays frozen in eval mode.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_cls.losses import ofd_loss, ofd_margins

from ._feature_common import model_taps
from .base import Distiller, register_distiller


def _last(items: Sequence, n: int) -> list:
    return list(items)[len(items) - n :]


class OFDConnectors(nn.Module):
    """One ``conv(k x k, no bias) + BN`` per stage, student channels -> teacher channels.

    Convs are initialised ``N(0, 2 / (k * k * out_channels))``, BN to identity.
    """

    def __init__(self, s_channels: Sequence[int], t_channels: Sequence[int], kernel_size: int = 1):
        super().__init__()
        if len(s_channels) != len(t_channels):
            raise ValueError(f"OFD: {len(s_channels)} student stages vs {len(t_channels)} teacher stages")
        self.connectors = nn.ModuleList(
            [self._connector(s, t, kernel_size) for s, t in zip(s_channels, t_channels)]
        )

    @staticmethod
    def _connector(s_channels: int, t_channels: int, kernel_size: int) -> nn.Sequential:
        conv = nn.Conv2d(
            s_channels, t_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False
        )
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
        bn = nn.BatchNorm2d(t_channels)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        return nn.Sequential(conv, bn)

    def forward(self, g_s: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [conn(f) for conn, f in zip(self.connectors, g_s)]


def _require(model: nn.Module, method_name: str, role: str) -> None:
    if not callable(getattr(model, method_name, None)):
        raise TypeError(f"OFD needs {method_name}() on the {role} {type(model).__name__}")


@register_distiller("OFD")
class OFD(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.OFD = CN()
        cfg.OFD.LOSS = CN()
        cfg.OFD.LOSS.CE_WEIGHT = 1.0
        cfg.OFD.LOSS.FEAT_WEIGHT = 0.001
        cfg.OFD.CONNECTOR = CN()
        cfg.OFD.CONNECTOR.KERNEL_SIZE = 1

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.ce_loss_weight = cfg.OFD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.OFD.LOSS.FEAT_WEIGHT
        _require(student, "get_stage_channels", "student")
        _require(teacher, "get_bn_before_relu", "teacher")
        s_taps = list(model_taps(student, "preact_feats", "OFD")[1:])
        t_taps = list(model_taps(teacher, "preact_feats", "OFD")[1:])
        t_bns = teacher.get_bn_before_relu()
        if len(t_bns) > len(t_taps):
            raise ValueError(
                f"OFD: teacher {type(teacher).__name__} has {len(t_bns)} BNs before ReLU "
                f"for only {len(t_taps)} pre-activation stages"
            )
        # Zoo models list the stem in get_stage_channels() or not (mdistiller's ResNet50);
        # the last entries always belong to the last stages.
        s_channels = list(student.get_stage_channels())
        if len(s_channels) < len(s_taps):
            raise ValueError(
                f"OFD: student {type(student).__name__} lists {len(s_channels)} stage channels "
                f"for {len(s_taps)} pre-activation stages"
            )
        # As mdistiller, stages are paired from the last one backwards; a teacher may list
        # fewer BNs than stages (ImageNet ResNets skip layer1), which bounds the pairs.
        self.num_stages = min(len(s_taps), len(t_taps), len(t_bns))
        self.s_taps = _last(s_taps, self.num_stages)
        self.t_taps = _last(t_taps, self.num_stages)
        self.connectors = OFDConnectors(
            _last(s_channels, self.num_stages),
            [bn.num_features for bn in _last(t_bns, self.num_stages)],
            kernel_size=cfg.OFD.CONNECTOR.KERNEL_SIZE,
        )

    def extra_modules(self):
        return [self.connectors]

    def margins(self) -> List[torch.Tensor]:
        """Per-stage ``(C_t,)`` margins from the registered teacher's BN before ReLU.

        Recomputed from the teacher each call (a few hundred channels), so that
        loading teacher weights after building the distiller is safe.
        """
        bns = _last(self.teacher.get_bn_before_relu(), self.num_stages)
        return [ofd_margins(bn.weight, bn.bias) for bn in bns]

    def forward_train(self, image, target, **kwargs):
        logits_s, g_s = self.run_student(image, self.s_taps)
        _, g_t = self.run_teacher(image, self.t_taps)
        loss = 0.0
        n = self.num_stages
        for i, (f_s, f_t, margin) in enumerate(zip(self.connectors(g_s), g_t, self.margins())):
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])
            loss = loss + ofd_loss(f_s, f_t, margin) / 2 ** (n - i - 1)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * loss,
        }
