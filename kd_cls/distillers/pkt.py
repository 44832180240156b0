"""Probabilistic knowledge transfer (Passalis & Tefas, arXiv 1803.10837), on the pooled features."""
import torch.nn.functional as F

from kd_cls.losses import pkt_loss

from ._feature_common import model_taps
from .base import Distiller, register_distiller


@register_distiller("PKT")
class PKT(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.PKT = CN()
        cfg.PKT.LOSS = CN()
        cfg.PKT.LOSS.CE_WEIGHT = 1.0
        cfg.PKT.LOSS.FEAT_WEIGHT = 30000.0

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.ce_loss_weight = cfg.PKT.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.PKT.LOSS.FEAT_WEIGHT
        self.s_taps = [model_taps(student, "pooled_feat", "PKT")]
        self.t_taps = [model_taps(teacher, "pooled_feat", "PKT")]

    def forward_train(self, image, target, **kwargs):
        logits_s, (f_s,) = self.run_student(image, self.s_taps)
        _, (f_t,) = self.run_teacher(image, self.t_taps)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * pkt_loss(f_s, f_t),
        }
