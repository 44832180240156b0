"""The model zoo. One file per family; each registers its constructors.

``build_model(name, num_classes=100, dataset="cifar100")`` builds one.
"""
from kd_cls.registry import import_submodules as _import_submodules

from .pretrained import load_pretrained, load_teacher
from .registry import build_model, default_weights, get_taps, model_names, register_model

_import_submodules(__name__, __path__)

__all__ = ["build_model", "default_weights", "get_taps", "model_names", "register_model", "load_pretrained",
           "load_teacher"]
