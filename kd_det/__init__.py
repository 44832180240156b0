"""kd_det: knowledge distillation for detectron2 detectors of any family.

Importing it registers, in detectron2's registries, the ``RCNNKD``
meta-architecture (mdistiller's name), a yacs-configurable ``FCOS`` and the
``build_resnet_fpn_backbone_kd`` / ``build_mobilenetv2_fpn_backbone`` /
``build_fcos_resnet_fpn_backbone`` backbones, plus the built-in KD methods.
Where detectron2 was built without its compiled ops, a placeholder for them is
registered first (see ``compat``).
"""
import warnings

from kd_det.compat import ensure_detectron2_ops

# detectron2 0.6 and fvcore script a few functions at import; torch 2.x warns about each one
# before any output of ours. The functions run the same either way.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
# Before any detectron2 module is imported: every kd_det submodule imports this package first.
ensure_detectron2_ops()

from kd_det import backbones, data, methods, modeling  # noqa: E402,F401
from kd_det.build import build_kd_model  # noqa: E402
from kd_det.checkpoint import KDCheckpointer, export_student, load_teacher_weights  # noqa: E402
from kd_det.config import add_kd_config, get_kd_cfg  # noqa: E402
from kd_det.distiller import DetectionDistiller, TeacherNotLoadedError  # noqa: E402
from kd_det.mdistiller import RCNNKD  # noqa: E402
from kd_det.methods import KD_METHODS, KDMethod, register_kd_method  # noqa: E402
from kd_det.teacher_cfg import build_teacher_cfg  # noqa: E402

__all__ = [
    "DetectionDistiller",
    "KDCheckpointer",
    "KDMethod",
    "KD_METHODS",
    "RCNNKD",
    "TeacherNotLoadedError",
    "add_kd_config",
    "build_kd_model",
    "build_teacher_cfg",
    "export_student",
    "get_kd_cfg",
    "load_teacher_weights",
    "register_kd_method",
]
