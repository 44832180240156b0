"""Detectors that detectron2 0.6 has but cannot build from a yacs config.

detectron2 0.6's FCOS exists for LazyConfig only (no ``META_ARCH_REGISTRY``
entry, no ``from_config``, no ``MODEL.FCOS`` keys). Importing this package
imports :mod:`kd_det.modeling.fcos`, which registers the ``"FCOS"``
meta-architecture and the ``build_fcos_resnet_fpn_backbone`` backbone in
detectron2's registries; call :func:`add_fcos_config` on a cfg before merging a
file that sets ``MODEL.FCOS.*``.
"""
from kd_det.modeling.fcos import FCOS, FCOSHead, add_fcos_config, build_fcos_resnet_fpn_backbone, group_norm_32

__all__ = ["FCOS", "FCOSHead", "add_fcos_config", "build_fcos_resnet_fpn_backbone", "group_norm_32"]
