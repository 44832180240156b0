"""Similarity-preserving KD (Tung & Mori, arXiv 1907.09682), on the last stage output."""
import torch.nn.functional as F

from kd_cls.losses import sp_loss

from ._feature_common import model_taps
from .base import Distiller, register_distiller


@register_distiller("SP")
class SP(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.SP = CN()
        cfg.SP.LOSS = CN()
        cfg.SP.LOSS.CE_WEIGHT = 1.0
        cfg.SP.LOSS.FEAT_WEIGHT = 3000.0

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.ce_loss_weight = cfg.SP.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.SP.LOSS.FEAT_WEIGHT
        self.s_taps = [model_taps(student, "feats", "SP")[-1]]
        self.t_taps = [model_taps(teacher, "feats", "SP")[-1]]

    def forward_train(self, image, target, **kwargs):
        logits_s, g_s = self.run_student(image, self.s_taps)
        _, g_t = self.run_teacher(image, self.t_taps)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * sp_loss(g_s, g_t),
        }
