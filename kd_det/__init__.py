"""kd_det: knowledge distillation for detectron2 detectors (ReviewKD, DKD, ReviewDKD).

Importing it registers, in detectron2's registries, the ``RCNNKD``
meta-architecture and the ``build_resnet_fpn_backbone_kd`` /
``build_mobilenetv2_fpn_backbone`` backbones. Where detectron2 was built without
its compiled ops, a placeholder for them is registered first (see ``compat``).
"""
from kd_det.compat import ensure_detectron2_ops

# Before any detectron2 module is imported: every kd_det submodule imports this package first.
ensure_detectron2_ops()

from kd_det import backbones, data, methods, modeling  # noqa: E402,F401
from kd_det.checkpoint import KDCheckpointer, export_student, load_teacher_weights  # noqa: E402
from kd_det.config import add_kd_config, build_teacher_cfg, get_kd_cfg  # noqa: E402
from kd_det.meta_arch import RCNNKD, TeacherNotLoadedError  # noqa: E402

__all__ = [
    "RCNNKD",
    "TeacherNotLoadedError",
    "KDCheckpointer",
    "add_kd_config",
    "build_kd_model",
    "build_teacher_cfg",
    "export_student",
    "get_kd_cfg",
    "load_teacher_weights",
]


def build_kd_model(cfg):
    """Build the model a config describes (RCNNKD or a plain detector), on ``cfg.MODEL.DEVICE``.

    With ``KD.FAST_ROI_ALIGN`` its RoIAlign layers get the fast CPU backward
    (:mod:`kd_det.roi_align`).
    """
    from detectron2.modeling import build_model

    from kd_det.meta_arch import check_registered_names
    from kd_det.roi_align import use_fast_roi_align

    check_registered_names(cfg)
    model = build_model(cfg)
    if cfg.KD.FAST_ROI_ALIGN:
        use_fast_roi_align(model)
    return model
