"""The default detection config: detectron2's, plus this package's nodes and every method's.

The bottom of ``kd_det``'s config modules: :mod:`kd_det.teacher_cfg` and
:mod:`kd_det.config` build on it.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _d2_get_cfg

from .methods import KD_METHODS
from .methods.base import config_node_name
from .modeling.fcos import add_fcos_config

__all__ = ["add_kd_config", "d2_defaults"]


def _add_method_nodes(cfg: CN) -> None:
    for name in KD_METHODS:
        if config_node_name(name) not in cfg.KD:
            KD_METHODS.get(name).add_config(cfg)


def add_kd_config(cfg: CN) -> CN:
    """Add the KD, TEACHER, MODEL.MOBILENETV2, MODEL.FCOS and DATASETS.COCO_JSON nodes to a detectron2 cfg.

    Every registered method adds its ``KD.<NAME>`` node. Idempotent: nodes already there are kept.
    """
    add_fcos_config(cfg)
    if "KD" in cfg and "TEACHER" in cfg:
        _add_method_nodes(cfg)
        return cfg
    d2 = _d2_get_cfg()

    cfg.MODEL.MOBILENETV2 = CN()
    cfg.MODEL.MOBILENETV2.OUT_FEATURES = ["m2"]
    cfg.MODEL.MOBILENETV2.NORM = "FrozenBN"
    cfg.MODEL.MOBILENETV2.WIDTH_MULT = 1.0

    # Extra COCO-json datasets: [[name, json_file, image_root], ...], registered at start-up.
    cfg.DATASETS.COCO_JSON = []

    cfg.KD = CN()
    cfg.KD.METHODS = []
    cfg.KD.TYPE = "DKD"  # mdistiller's; read only when MODEL.META_ARCHITECTURE is RCNNKD
    cfg.KD.IMPORTS = []
    cfg.KD.INHERIT = []
    # Tests and benchmarks only: train against a teacher whose weights were never loaded.
    cfg.KD.ALLOW_RANDOM_TEACHER = False
    # Speed only, results equal within float rounding: the teacher runs from an
    # inference copy with its frozen BNs folded into the convolutions, in NHWC.
    cfg.KD.FOLD_TEACHER_BN = True
    cfg.KD.TEACHER_CHANNELS_LAST = True
    # Speed only, gradients equal within float rounding: RoIAlign's CPU backward
    # as one sparse product (kd_det.roi_align), for every detector built here.
    cfg.KD.FAST_ROI_ALIGN = True
    # Checkpoints hold the teacher's weight source, not its tensors; True also writes the tensors
    # (mdistiller's combined layout, loadable without the source file).
    cfg.KD.SAVE_TEACHER = False
    _add_method_nodes(cfg)

    cfg.TEACHER = CN(new_allowed=True)
    cfg.TEACHER.CONFIG_FILE = ""
    cfg.TEACHER.MODEL = CN(new_allowed=True)
    cfg.TEACHER.MODEL.WEIGHTS = ""
    cfg.TEACHER.MODEL.PIXEL_MEAN = list(d2.MODEL.PIXEL_MEAN)
    cfg.TEACHER.MODEL.PIXEL_STD = list(d2.MODEL.PIXEL_STD)
    cfg.TEACHER.INPUT = CN(new_allowed=True)
    cfg.TEACHER.INPUT.FORMAT = d2.INPUT.FORMAT
    return cfg


def d2_defaults() -> CN:
    """detectron2's defaults with :func:`add_kd_config`."""
    return add_kd_config(_d2_get_cfg())
