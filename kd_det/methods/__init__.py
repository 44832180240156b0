"""Detection KD methods, one file each; each registers itself (see :mod:`kd_det.methods.base`)."""
from kd_cls.registry import import_submodules as _import_submodules

from .base import KD_METHODS, KDMethod, register_kd_method

_import_submodules(__name__, __path__)

__all__ = ["KD_METHODS", "KDMethod", "register_kd_method"]
