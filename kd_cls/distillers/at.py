"""Attention transfer (Zagoruyko & Komodakis, arXiv 1612.03928), on every stage output after the stem."""
import torch.nn.functional as F

from kd_cls.losses import at_loss

from ._feature_common import model_taps
from .base import Distiller, register_distiller


@register_distiller("AT")
class AT(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.AT = CN()
        cfg.AT.P = 2
        cfg.AT.LOSS = CN()
        cfg.AT.LOSS.CE_WEIGHT = 1.0
        cfg.AT.LOSS.FEAT_WEIGHT = 1000.0

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.p = cfg.AT.P
        self.ce_loss_weight = cfg.AT.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.AT.LOSS.FEAT_WEIGHT
        self.s_taps = list(model_taps(student, "feats", "AT")[1:])
        self.t_taps = list(model_taps(teacher, "feats", "AT")[1:])

    def forward_train(self, image, target, **kwargs):
        logits_s, g_s = self.run_student(image, self.s_taps)
        _, g_t = self.run_teacher(image, self.t_taps)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * at_loss(g_s, g_t, self.p),
        }
