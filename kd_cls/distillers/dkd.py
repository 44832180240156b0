"""Decoupled KD (Zhao et al., CVPR 2022, arXiv 2203.08679)."""
import torch.nn.functional as F

from kd_cls.losses import dkd_loss

from .base import Distiller, register_distiller, warmup_factor


@register_distiller("DKD")
class DKD(Distiller):
    teacher_logits_only = True

    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.DKD = CN()
        cfg.DKD.CE_WEIGHT = 1.0
        cfg.DKD.ALPHA = 1.0
        cfg.DKD.BETA = 8.0
        cfg.DKD.T = 4.0
        cfg.DKD.WARMUP = 20  # epochs of linear warm-up of the KD term

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.ce_weight = cfg.DKD.CE_WEIGHT
        self.alpha = cfg.DKD.ALPHA
        self.beta = cfg.DKD.BETA
        self.temperature = cfg.DKD.T
        self.warmup = cfg.DKD.WARMUP

    def forward_train(self, image, target, epoch=None, index=None, view=None, **kwargs):
        logits_s, _ = self.run_student(image)
        logits_t, _ = self.run_teacher(image, index=index, view=view)
        loss_kd = warmup_factor(epoch, self.warmup) * dkd_loss(
            logits_s, logits_t, target, self.alpha, self.beta, self.temperature
        )
        return logits_s, {"loss_ce": self.ce_weight * F.cross_entropy(logits_s, target), "loss_kd": loss_kd}
