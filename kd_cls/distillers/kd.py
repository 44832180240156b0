"""Hinton KD (arXiv 1503.02531)."""
import torch.nn.functional as F

from kd_cls.losses import kd_loss

from .base import Distiller, register_distiller


@register_distiller("KD")
class KD(Distiller):
    teacher_logits_only = True

    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.KD = CN()
        cfg.KD.TEMPERATURE = 4
        cfg.KD.LOSS = CN()
        cfg.KD.LOSS.CE_WEIGHT = 0.1
        cfg.KD.LOSS.KD_WEIGHT = 0.9

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.temperature = cfg.KD.TEMPERATURE
        self.ce_weight = cfg.KD.LOSS.CE_WEIGHT
        self.kd_weight = cfg.KD.LOSS.KD_WEIGHT

    def forward_train(self, image, target, index=None, view=None, **kwargs):
        logits_s, _ = self.run_student(image)
        logits_t, _ = self.run_teacher(image, index=index, view=view)
        return logits_s, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.kd_weight * kd_loss(logits_s, logits_t, self.temperature),
        }
