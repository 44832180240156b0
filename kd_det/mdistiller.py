"""mdistiller compatibility: ``MODEL.META_ARCHITECTURE: RCNNKD`` and ``KD.TYPE``.

mdistiller's detection configs name the architecture ``RCNNKD`` and pick the
methods with ``KD.TYPE``. Here ``RCNNKD`` is a thin alias of the distiller: a
``GeneralizedRCNN`` student whose methods are ``KD_TYPES[KD.TYPE]``
(``ReviewDKD`` = ReviewKD + DKD). Its checkpoints keep mdistiller's names:
student keys at the top level, the teacher under ``teacher.``, ReviewKD's
fusion modules under ``kd_trans.``. mdistiller's 12 configs train verbatim.
"""
from __future__ import annotations

from detectron2.modeling import META_ARCH_REGISTRY

from .build import distiller_kwargs, load_teacher_and_inherit
from .distiller import DetectionDistiller

__all__ = ["RCNNKD"]


@META_ARCH_REGISTRY.register()
class RCNNKD(DetectionDistiller):
    """A ``GeneralizedRCNN`` student distilled with the methods of ``KD.TYPE`` (mdistiller's name)."""

    def __init__(self, cfg):
        super().__init__(**distiller_kwargs(cfg, "GeneralizedRCNN"))
        load_teacher_and_inherit(self, cfg)
