"""``build_resnet_fpn_backbone_kd``: mdistiller's name for a ResNet-FPN backbone.

detectron2's own ResNet covers depths 18/34 (``BasicBlock``) as well as
50/101/152, so the alias simply builds detectron2's ResNet-FPN. ResNet-18/34
need ``MODEL.RESNETS.RES2_OUT_CHANNELS: 64``; that is checked here with a
one-line error because detectron2's assert does not say which key to change.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from kd_cls.config import ConfigError


def check_resnet_cfg(cfg) -> None:
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in (18, 34, 50, 101, 152):
        raise ConfigError(f"unknown MODEL.RESNETS.DEPTH {depth}. Valid choices: 18, 34, 50, 101, 152")
    if depth in (18, 34) and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS != 64:
        raise ConfigError(
            f"ResNet-{depth} needs MODEL.RESNETS.RES2_OUT_CHANNELS 64, got {cfg.MODEL.RESNETS.RES2_OUT_CHANNELS}"
        )


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_backbone_kd(cfg, input_shape: ShapeSpec):
    """ResNet-{18,34,50,101,152} + FPN (p2-p6), i.e. detectron2's ``build_resnet_fpn_backbone``."""
    check_resnet_cfg(cfg)
    return build_resnet_fpn_backbone(cfg, input_shape)
