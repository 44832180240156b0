"""FCOS as a yacs-configurable detectron2 detector: ``MODEL.META_ARCHITECTURE: "FCOS"``.

Why this module exists: detectron2 0.6 ships FCOS
(``detectron2/modeling/meta_arch/fcos.py``) for its LazyConfig system only. Its
``FCOS`` is not in ``META_ARCH_REGISTRY`` and has no ``from_config``, so a yacs
YAML (the format every config of this project uses) cannot name it, and
detectron2 has no ``MODEL.FCOS`` config node. This module adds what is missing,
without touching detectron2's class:

* :func:`add_fcos_config` adds ``cfg.MODEL.FCOS`` whose defaults are those of
  detectron2 v0.6's ``configs/COCO-Detection/fcos_R_50_FPN_1x.py`` (through
  ``configs/common/models/fcos.py`` and ``configs/common/models/retinanet.py``)
  and, where that file does not set a value, of ``FCOS.__init__``.
* :class:`FCOS` subclasses detectron2's ``FCOS`` (so ``from
  detectron2.modeling.meta_arch.fcos import FCOS`` keeps working and
  ``isinstance`` checks against it hold), adds ``from_config`` and registers
  the subclass in ``META_ARCH_REGISTRY`` under the name ``"FCOS"``.
* :func:`build_fcos_resnet_fpn_backbone` is the ResNet-FPN backbone of the FCOS
  LazyConfig: P3-P5 from res3-res5 and P6/P7 computed from P5 (detectron2's
  ``build_retinanet_resnet_fpn_backbone`` computes them from C5 / res5).
* :func:`group_norm_32` works around detectron2 0.6's head refusing
  ``norm="GN"`` under current torch (see its docstring); a LazyConfig FCOS runs
  with ``model.head.norm = group_norm_32``.

The module is imported by :mod:`kd_det.modeling`, so ``import kd_det.modeling``
registers both names.
"""
from __future__ import annotations

from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead

from kd_det.backbones.resnet_fpn import check_resnet_cfg

__all__ = ["FCOS", "FCOSHead", "add_fcos_config", "build_fcos_resnet_fpn_backbone", "group_norm_32"]


def add_fcos_config(cfg: CN) -> CN:
    """Add the ``MODEL.FCOS`` node to a detectron2 cfg (in place) and return the cfg.

    Idempotent: a cfg that already has ``MODEL.FCOS`` is returned unchanged.

    Sources of the defaults (paths in detectron2 v0.6):

    * ``LC-fcos``:  ``configs/common/models/fcos.py`` (FCOS LazyConfig model);
    * ``LC-retina``: ``configs/common/models/retinanet.py`` (its base, which
      ``LC-fcos`` edits);
    * ``init``: ``detectron2/modeling/meta_arch/fcos.py``, ``FCOS.__init__``
      keyword defaults (values that the LazyConfig leaves alone).

    Keys shared with other detectors are not duplicated here: pixel mean/std
    (``MODEL.PIXEL_MEAN/STD``), input format (``INPUT.FORMAT``), detections per
    image (``TEST.DETECTIONS_PER_IMAGE``), FPN width (``MODEL.FPN.OUT_CHANNELS``)
    and the ResNet keys. detectron2's defaults for all of them already equal
    the FCOS LazyConfig's values (``LC-retina``: pixel_mean [103.530, 116.280,
    123.675], pixel_std [1, 1, 1], FPN out_channels 256; ``init``:
    max_detections_per_image 100; ``configs/common/data/coco.py``: image_format
    "BGR").
    """
    if "FCOS" in cfg.MODEL:
        return cfg
    _c = cfg.MODEL.FCOS = CN()
    # LC-retina: num_classes=80 (LC-fcos keeps it).
    _c.NUM_CLASSES = 80
    # LC-retina: head_in_features=["p3", "p4", "p5", "p6", "p7"].
    _c.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # LC-retina: head conv_dims=[256, 256, 256, 256], i.e. four convs per branch, each as
    # wide as the FPN output (the yacs head uses the input feature width, as RetinaNetHead does).
    _c.NUM_CONVS = 4
    # LC-fcos: model.head.norm = "GN" (detectron2's RetinaNetHead default is "").
    _c.NORM = "GN"
    # LC-retina: head prior_prob=0.01 (initial bias of the classification logits).
    _c.PRIOR_PROB = 0.01
    # LC-retina: focal_loss_alpha=0.25, focal_loss_gamma=2.0 (also the init defaults).
    _c.FOCAL_LOSS_ALPHA = 0.25
    _c.FOCAL_LOSS_GAMMA = 2.0
    # init: center_sampling_radius=1.5 (not set by the LazyConfig).
    _c.CENTER_SAMPLING_RADIUS = 1.5
    # LC-fcos: model.test_score_thresh = 0.2 (threshold on sqrt(cls score * centerness)).
    _c.SCORE_THRESH_TEST = 0.2
    # init: test_topk_candidates=1000 (not set by the LazyConfig).
    _c.TOPK_CANDIDATES_TEST = 1000
    # LC-fcos: model.test_nms_thresh = 0.6.
    _c.NMS_THRESH_TEST = 0.6
    # LC-fcos: model.backbone.top_block.in_feature = "p5" and in_channels = 256, i.e. P6/P7
    # are computed from the FPN's P5 (Sec. 2.2 of arXiv:2006.09214), not from res5 as in
    # RetinaNet. Read by build_fcos_resnet_fpn_backbone; "res5" gives RetinaNet's P6/P7.
    _c.TOP_BLOCK_IN_FEATURE = "p5"
    return cfg


def _top_block_in_channels(bottom_up, in_feature: str, fpn_out_channels: int) -> int:
    shapes = bottom_up.output_shape()
    if in_feature in shapes:
        return shapes[in_feature].channels
    if in_feature.startswith("p"):
        return fpn_out_channels
    raise ValueError(
        f"MODEL.FCOS.TOP_BLOCK_IN_FEATURE {in_feature!r} is neither an FPN level (p3..p5) "
        f"nor a bottom-up feature ({', '.join(shapes)})"
    )


def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-{18,34,50,101,152} + FPN giving p3..p7, P6/P7 from ``MODEL.FCOS.TOP_BLOCK_IN_FEATURE``.

    With the default ``"p5"`` this is the backbone of detectron2 v0.6's
    ``configs/common/models/fcos.py``: ``LastLevelP6P7(256, 256, in_feature="p5")``
    on an FPN over res3-res5. ResNet-18/34 need ``MODEL.RESNETS.RES2_OUT_CHANNELS 64``
    (a one-line error says so).
    """
    check_resnet_cfg(cfg)
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    in_feature = cfg.MODEL.FCOS.TOP_BLOCK_IN_FEATURE
    in_channels = _top_block_in_channels(bottom_up, in_feature, out_channels)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(in_channels, out_channels, in_feature=in_feature),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def group_norm_32(channels: int) -> nn.GroupNorm:
    """detectron2's ``"GN"`` (``nn.GroupNorm(32, channels)``), also accepting ``channels < 32``.

    detectron2 0.6's ``RetinaNetHead.__init__`` (which ``FCOSHead`` runs) builds
    ``get_norm(norm, 1)`` once, only to read the norm's type name. Current torch
    rejects ``nn.GroupNorm(32, 1)`` (channels must divide into the groups), so
    ``norm="GN"`` fails there, in detectron2's own LazyConfig FCOS too. This
    callable gives that one-channel probe a one-group GroupNorm and every real
    layer (256 channels) exactly ``nn.GroupNorm(32, channels)``.
    """
    return nn.GroupNorm(32 if channels >= 32 else 1, channels)


def _head_norm(norm):
    """The ``norm`` argument for ``FCOSHead``: ``MODEL.FCOS.NORM``, with "GN" as :func:`group_norm_32`."""
    return group_norm_32 if norm == "GN" else norm


class FCOS(_D2FCOS):
    """detectron2's ``FCOS``, buildable from a yacs cfg (``MODEL.META_ARCHITECTURE: "FCOS"``).

    The constructor takes every keyword argument of detectron2's ``FCOS`` plus
    ``input_format`` and ``vis_period``, which detectron2 0.6's ``RetinaNet``
    takes but its ``FCOS`` does not: ``DenseDetector.visualize_training`` reads
    ``self.input_format``, and the attributes let code treat both dense
    detectors alike. Neither changes training or inference.
    """

    @configurable
    def __init__(self, *, input_format: str = "BGR", vis_period: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.input_format = input_format
        self.vis_period = vis_period

    @classmethod
    def from_config(cls, cfg):
        if "FCOS" not in cfg.MODEL:
            raise KeyError("cfg has no MODEL.FCOS node: call kd_det.modeling.fcos.add_fcos_config(cfg) first")
        f = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [k for k in f.IN_FEATURES if k not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES {list(f.IN_FEATURES)}: the backbone "
                f"{cfg.MODEL.BACKBONE.NAME!r} has no {missing} (it gives {sorted(shapes)})"
            )
        feature_shapes = [shapes[k] for k in f.IN_FEATURES]
        head = FCOSHead(
            input_shape=feature_shapes,
            num_classes=f.NUM_CLASSES,
            conv_dims=[feature_shapes[0].channels] * f.NUM_CONVS,
            norm=_head_norm(f.NORM),
            prior_prob=f.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(f.IN_FEATURES),
            # None: detectron2's FCOS default, Box2BoxTransformLinear(normalize_by_size=True).
            "box2box_transform": None,
            "num_classes": f.NUM_CLASSES,
            "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": f.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": f.FOCAL_LOSS_GAMMA,
            "test_score_thresh": f.SCORE_THRESH_TEST,
            "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": f.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
        }


def _register_once(registry, obj) -> None:
    """Register ``obj`` under its ``__name__`` unless that name is taken.

    Not the bare ``@REGISTRY.register()`` decorator, which raises on a second
    registration (a reload of this module). A name already taken by someone
    else keeps its owner.
    """
    if obj.__name__ not in registry:
        registry.register(obj)


_register_once(BACKBONE_REGISTRY, build_fcos_resnet_fpn_backbone)
_register_once(META_ARCH_REGISTRY, FCOS)
