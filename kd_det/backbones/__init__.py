"""Backbones registered in detectron2's ``BACKBONE_REGISTRY`` (every module here is imported)."""
from kd_cls.registry import import_submodules as _import_submodules

_import_submodules(__name__, __path__)
