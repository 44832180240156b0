"""KD with singular value decomposition (Lee et al., arXiv 1807.06819), on every stage output after the stem.

Teacher and student stages must have equal spatial sizes (same-family pairs
such as resnet32x4 -> resnet8x4, vgg13 -> vgg8, wrn_40_2 -> wrn_16_2).
"""
import torch.nn.functional as F

from kd_cls.losses import kdsvd_loss

from ._feature_common import model_taps
from .base import Distiller, register_distiller


@register_distiller("KDSVD")
class KDSVD(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.KDSVD = CN()
        cfg.KDSVD.K = 1
        cfg.KDSVD.LOSS = CN()
        cfg.KDSVD.LOSS.CE_WEIGHT = 1.0
        cfg.KDSVD.LOSS.FEAT_WEIGHT = 1.0

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.k = cfg.KDSVD.K
        self.ce_loss_weight = cfg.KDSVD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.KDSVD.LOSS.FEAT_WEIGHT
        self.s_taps = list(model_taps(student, "feats", "KDSVD")[1:])
        self.t_taps = list(model_taps(teacher, "feats", "KDSVD")[1:])

    def forward_train(self, image, target, **kwargs):
        logits_s, g_s = self.run_student(image, self.s_taps)
        _, g_t = self.run_teacher(image, self.t_taps)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * kdsvd_loss(g_s, g_t, self.k),
        }
