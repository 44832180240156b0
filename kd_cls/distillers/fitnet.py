"""FitNets: hints for thin deep nets (Romero et al., arXiv 1412.6550).

The student's ``feats[HINT_LAYER]`` passes through a regressor (conv, BN,
ReLU; see ``ConvReg``) to the teacher's ``feats[HINT_LAYER]`` shape and is
matched by MSE. The regressor's shape is found by running both models once on
a ``(1, 3, *INPUT_SIZE)`` random input, in eval mode.
"""
import torch.nn.functional as F

from kd_cls.losses import hint_loss

from kd_cls.nn.connectors import ConvReg

from ._feature_common import feature_pair_shapes, model_taps, pick_tap
from .base import Distiller, register_distiller


@register_distiller("FITNET")
class FitNet(Distiller):
    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.FITNET = CN()
        cfg.FITNET.HINT_LAYER = 2  # index into feats: 0 is the stem, then one per stage
        cfg.FITNET.INPUT_SIZE = (32, 32)
        cfg.FITNET.LOSS = CN()
        cfg.FITNET.LOSS.CE_WEIGHT = 1.0
        cfg.FITNET.LOSS.FEAT_WEIGHT = 100.0

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        self.ce_loss_weight = cfg.FITNET.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.FITNET.LOSS.FEAT_WEIGHT
        hint = cfg.FITNET.HINT_LAYER
        self.s_taps = [pick_tap(model_taps(student, "feats", "FITNET"), hint, "FITNET.HINT_LAYER")]
        self.t_taps = [pick_tap(model_taps(teacher, "feats", "FITNET"), hint, "FITNET.HINT_LAYER")]
        (s_shape,), (t_shape,) = feature_pair_shapes(student, teacher, self.s_taps, self.t_taps, cfg.FITNET.INPUT_SIZE)
        self.conv_reg = ConvReg(s_shape, t_shape)

    def extra_modules(self):
        return [self.conv_reg]

    def forward_train(self, image, target, **kwargs):
        logits_s, (f_s,) = self.run_student(image, self.s_taps)
        _, (f_t,) = self.run_teacher(image, self.t_taps)
        return logits_s, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_s, target),
            "loss_kd": self.feat_loss_weight * hint_loss(self.conv_reg(f_s), f_t),
        }
