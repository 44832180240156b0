"""Distillation methods, one file each; ``build_distiller(cfg, student, teacher)``."""
from kd_cls.registry import import_submodules as _import_submodules

from .base import DISTILLERS, Distiller, add_distiller_configs, build_distiller, register_distiller

_import_submodules(__name__, __path__)

__all__ = ["DISTILLERS", "Distiller", "add_distiller_configs", "build_distiller", "register_distiller"]
