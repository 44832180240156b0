"""Optimizers. ``DOT`` is the distillation-oriented trainer (ICCV 2023)."""
from kd_cls.registry import import_submodules as _import_submodules

_import_submodules(__name__, __path__)

from .dot import DOT  # noqa: E402

__all__ = ["DOT"]
