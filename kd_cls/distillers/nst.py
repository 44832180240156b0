"""Neuron selectivity transfer (Huang & Wang, arXiv 1707.01219), on every stage output after the stem."""
import torch.nn.functional as F

from kd_cls.losses import nst_loss

from ._feature_common import model_taps
from .base import Distiller, register_distiller


@register_distiller("NST")
class NST(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.NST = CN()
        cfg.NST.LOSS = CN()
        cfg.NST.LOSS.CE_WEIGHT = 1.0
        cfg.NST.LOSS.FEAT_WEIGHT = 50.0

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.ce_loss_weight = cfg.NST.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.NST.LOSS.FEAT_WEIGHT
        self.s_taps = list(model_taps(student, "feats", "NST")[1:])
        self.t_taps = list(model_taps(teacher, "feats", "NST")[1:])

    def forward_train(self, image, target, **kwargs):
        logits_s, g_s = self.run_student(image, self.s_taps)
        _, g_t = self.run_teacher(image, self.t_taps)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * nst_loss(g_s, g_t),
        }
