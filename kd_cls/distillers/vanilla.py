"""Vanilla training: cross-entropy on the student alone (``DISTILLER.TYPE: NONE``)."""
import torch.nn.functional as F

from .base import Distiller, register_distiller


@register_distiller("NONE")
class Vanilla(Distiller):
    def forward_train(self, image, target, **kwargs):
        logits = self.student(image)
        return logits, {"loss_ce": F.cross_entropy(logits, target)}
