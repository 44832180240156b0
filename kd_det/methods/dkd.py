"""DKD on R-CNN RoI class logits (Zhao et al., CVPR 2022, arXiv 2203.08679): loss ``loss_dkd``.

The teacher's box head runs on the student's sampled proposals, so both give
logits for the same RoIs; ``gt_classes`` are the sampled proposals' labels.
Keys ``KD.DKD.{ALPHA, BETA, T}`` (mdistiller's detection defaults 1.0, 0.25, 1.0)
and ``LOSS_WEIGHT``.
"""
from detectron2.config import CfgNode as CN

from kd_cls.losses import dkd_loss

from .base import ROI_LOGITS, KDMethod, register_kd_method


@register_kd_method("DKD")
class DKDRoI(KDMethod):
    ATTR = "kd_dkd"
    NEEDS = (ROI_LOGITS,)
    STUDENT_FAMILIES = ("rcnn",)
    TEACHER_FAMILIES = ("rcnn",)

    def __init__(self, alpha: float, beta: float, temperature: float, loss_weight: float = 1.0):
        super().__init__()
        self.alpha, self.beta, self.temperature, self.loss_weight = alpha, beta, temperature, loss_weight

    @staticmethod
    def add_config(cfg):
        cfg.KD.DKD = CN()
        cfg.KD.DKD.ALPHA = 1.0
        cfg.KD.DKD.BETA = 0.25
        cfg.KD.DKD.T = 1.0
        cfg.KD.DKD.LOSS_WEIGHT = 1.0

    @classmethod
    def from_config(cls, cfg, pair):
        d = cfg.KD.DKD
        return cls(d.ALPHA, d.BETA, d.T, d.LOSS_WEIGHT)

    def forward(self, inputs):
        loss = dkd_loss(inputs.student_roi_logits, inputs.teacher_roi_logits, inputs.roi_gt_classes,
                        self.alpha, self.beta, self.temperature)
        return {"loss_dkd": self.loss_weight * loss}
