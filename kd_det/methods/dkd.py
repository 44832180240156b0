"""DKD on RoI class logits (Zhao et al., CVPR 2022): ``KD.DKD.{ALPHA, BETA, T}``, loss ``loss_dkd``."""
from torch import nn

from kd_cls.losses import dkd_loss
from .base import KDInputs, register_kd_method


@register_kd_method("DKD")
class DKDRoI(nn.Module):
    ATTR = "kd_dkd"
    NEEDS_ROI_LOGITS = True

    def __init__(self, alpha: float, beta: float, temperature: float):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    @classmethod
    def from_models(cls, cfg, student, teacher):
        d = cfg.KD.DKD
        return cls(d.ALPHA, d.BETA, d.T)

    def forward(self, inputs: KDInputs):
        loss = dkd_loss(
            inputs.student_logits, inputs.teacher_logits, inputs.gt_classes, self.alpha, self.beta, self.temperature
        )
        return {"loss_dkd": loss}
