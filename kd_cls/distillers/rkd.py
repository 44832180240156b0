"""Relational knowledge distillation (Park et al., arXiv 1904.05068), on the pooled features."""
import torch.nn.functional as F

from kd_cls.losses import rkd_loss

from ._feature_common import model_taps
from .base import Distiller, register_distiller


@register_distiller("RKD")
class RKD(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.RKD = CN()
        cfg.RKD.DISTANCE_WEIGHT = 25
        cfg.RKD.ANGLE_WEIGHT = 50
        cfg.RKD.LOSS = CN()
        cfg.RKD.LOSS.CE_WEIGHT = 1.0
        cfg.RKD.LOSS.FEAT_WEIGHT = 1.0
        cfg.RKD.PDIST = CN()
        cfg.RKD.PDIST.EPSILON = 1e-12
        cfg.RKD.PDIST.SQUARED = False

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.distance_weight = cfg.RKD.DISTANCE_WEIGHT
        self.angle_weight = cfg.RKD.ANGLE_WEIGHT
        self.ce_loss_weight = cfg.RKD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.RKD.LOSS.FEAT_WEIGHT
        self.eps = cfg.RKD.PDIST.EPSILON
        self.squared = cfg.RKD.PDIST.SQUARED
        self.s_taps = [model_taps(student, "pooled_feat", "RKD")]
        self.t_taps = [model_taps(teacher, "pooled_feat", "RKD")]

    def forward_train(self, image, target, **kwargs):
        logits_s, (f_s,) = self.run_student(image, self.s_taps)
        _, (f_t,) = self.run_teacher(image, self.t_taps)
        loss = rkd_loss(f_s, f_t, self.squared, self.eps, self.distance_weight, self.angle_weight)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * loss,
        }
