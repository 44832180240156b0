"""ReviewKD: knowledge review with attention-based fusion (Chen et al., CVPR 2021, arXiv 2104.09044).

The student's stage features, deepest first (the pooled feature as a 1x1 map,
then the last stages), pass through a chain of ABF modules. Each ABF projects
its stage to ``mid`` channels and fuses it with the previous (deeper) ABF's
output, upsampled, by a learned 2-way spatial attention. Its output is then
mapped to the teacher's channels and size and compared with the teacher's
pre-activation feature by :func:`kd_cls.losses.hcl_loss`.

Config (``REVIEWKD.*``), one entry per fused feature, as in mdistiller:
``IN_CHANNELS`` (student) and ``OUT_CHANNELS`` (teacher) are listed shallow to
deep, the last entry being the pooled feature; ``SHAPES`` (student map side) and
``OUT_SHAPES`` (teacher map side) are listed deep to shallow, starting with the
pooled feature's 1.
``mid = min(MAX_MID_CHANNEL, IN_CHANNELS[-1])``; mdistiller ignores
``MAX_MID_CHANNEL`` and uses 512.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_cls.losses import hcl_loss
from kd_cls.models import get_taps
from kd_cls.nn.connectors import ABF

from ._feature_common import feature_pair_shapes
from .base import Distiller, register_distiller, warmup_factor


@register_distiller("REVIEWKD")
class ReviewKD(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.REVIEWKD = CN()
        cfg.REVIEWKD.CE_WEIGHT = 1.0
        cfg.REVIEWKD.REVIEWKD_WEIGHT = 1.0
        cfg.REVIEWKD.WARMUP_EPOCHS = 20
        cfg.REVIEWKD.SHAPES = [1, 8, 16, 32]
        cfg.REVIEWKD.OUT_SHAPES = [1, 8, 16, 32]
        cfg.REVIEWKD.IN_CHANNELS = [64, 128, 256, 256]
        cfg.REVIEWKD.OUT_CHANNELS = [64, 128, 256, 256]
        cfg.REVIEWKD.MAX_MID_CHANNEL = 512
        cfg.REVIEWKD.STU_PREACT = False

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        c = cfg.REVIEWKD
        lists = {"SHAPES": c.SHAPES, "OUT_SHAPES": c.OUT_SHAPES, "IN_CHANNELS": c.IN_CHANNELS,
                 "OUT_CHANNELS": c.OUT_CHANNELS}
        n = len(c.IN_CHANNELS)
        lengths = {k: len(v) for k, v in lists.items()}
        if n < 1 or any(v != n for v in lengths.values()):
            raise ValueError(f"REVIEWKD lists must have one entry per feature; got lengths {lengths}")
        self.shapes = list(c.SHAPES)
        self.out_shapes = list(c.OUT_SHAPES)
        self.in_channels = list(c.IN_CHANNELS)
        self.out_channels = list(c.OUT_CHANNELS)
        self.ce_loss_weight = c.CE_WEIGHT
        self.reviewkd_loss_weight = c.REVIEWKD_WEIGHT
        self.warmup_epochs = c.WARMUP_EPOCHS
        self.stu_preact = bool(c.STU_PREACT)
        self.max_mid_channel = int(c.MAX_MID_CHANNEL)
        mid = min(self.max_mid_channel, self.in_channels[-1])
        # Built shallow to deep, then stored deep to shallow (the order they run in);
        # every ABF but the deepest fuses. Same module order as mdistiller's ``abfs``.
        pairs = zip(self.in_channels, self.out_channels)
        abfs = [ABF(cin, mid, cout, i < n - 1) for i, (cin, cout) in enumerate(pairs)]
        self.abfs = nn.ModuleList(abfs[::-1])
        self._tap_s = self._feature_taps(student, "preact_feats" if self.stu_preact else "feats", n, "student")
        self._tap_t = self._feature_taps(teacher, "preact_feats", n, "teacher")
        self._checked = False

    @staticmethod
    def _feature_taps(model: nn.Module, kind: str, n: int, role: str) -> List[str]:
        """The last ``n - 1`` stage taps of ``kind`` plus the pooled feature, shallow to deep."""
        taps = get_taps(model)
        stages = list(taps.get(kind) or [])
        if len(stages) < n - 1:
            raise ValueError(f"ReviewKD: REVIEWKD.IN_CHANNELS has {n} entries, so the {role} needs {n - 1} "
                             f"'{kind}' stages, but {type(model).__name__} declares {len(stages)}")
        return (stages[len(stages) - (n - 1):] if n > 1 else []) + [taps["pooled_feat"]]

    def extra_modules(self):
        return [self.abfs]

    @staticmethod
    def _as_map(f: torch.Tensor) -> torch.Tensor:
        return f.reshape(f.shape[0], -1, 1, 1) if f.dim() == 2 else f

    def _check(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> None:
        n = len(self.in_channels)
        for i, (fs, ft) in enumerate(zip(feats_s, feats_t)):
            j = n - 1 - i  # SHAPES/OUT_SHAPES run deep to shallow
            if fs.shape[1] != self.in_channels[i] or ft.shape[1] != self.out_channels[i]:
                raise ValueError(
                    f"ReviewKD feature {i}: student has {fs.shape[1]} channels (REVIEWKD.IN_CHANNELS[{i}]="
                    f"{self.in_channels[i]}), teacher {ft.shape[1]} (REVIEWKD.OUT_CHANNELS[{i}]={self.out_channels[i]})"
                )
            if ft.shape[-1] != self.out_shapes[j]:
                raise ValueError(f"ReviewKD feature {i}: teacher map is {ft.shape[-1]} px but "
                                 f"REVIEWKD.OUT_SHAPES[{j}] is {self.out_shapes[j]}")
            if fs.shape[-1] != self.shapes[j]:
                raise ValueError(f"ReviewKD feature {i}: student map is {fs.shape[-1]} px but "
                                 f"REVIEWKD.SHAPES[{j}] is {self.shapes[j]}")
        self._checked = True

    def check_shapes(self, image_size: int) -> None:
        s_shapes, t_shapes = feature_pair_shapes(self.student, self.teacher, self._tap_s, self._tap_t,
                                                 (image_size,) * 2)
        self._check([self._as_map(torch.empty(s)) for s in s_shapes], [self._as_map(torch.empty(t)) for t in t_shapes])

    def review(self, feats_s: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Student features, shallow to deep -> ABF outputs, shallow to deep."""
        x = list(feats_s)[::-1]
        shapes, out_shapes = self.shapes, self.out_shapes
        out, res = self.abfs[0](x[0], out_shape=out_shapes[0])
        results = [out]
        for feat, abf, shape, out_shape in zip(x[1:], self.abfs[1:], shapes[1:], out_shapes[1:]):
            out, res = abf(feat, res, shape, out_shape)
            results.insert(0, out)
        return results

    def forward_train(self, image, target, epoch=None, **kwargs):
        logits_s, feats_s = self.run_student(image, self._tap_s)
        _, feats_t = self.run_teacher(image, self._tap_t)
        feats_s = [self._as_map(f) for f in feats_s]
        feats_t = [self._as_map(f) for f in feats_t]
        if not self._checked:
            self._check(feats_s, feats_t)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_s, target)
        loss_kd = (self.reviewkd_loss_weight * warmup_factor(epoch, self.warmup_epochs)
                   * hcl_loss(self.review(feats_s), feats_t))
        return logits_s, {"loss_ce": loss_ce, "loss_kd": loss_kd}
