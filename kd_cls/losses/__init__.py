"""Distillation losses: plain functions of tensors, shared by kd_cls and kd_det.

Each submodule groups one family and lists its public functions in ``__all__``;
they are all re-exported here (``from kd_cls.losses import dkd_loss``).
"""
import importlib as _importlib
import pkgutil as _pkgutil

__all__ = []
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name.startswith("_"):
        continue
    _mod = _importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
