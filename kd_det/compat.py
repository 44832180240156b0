"""Run detectron2 0.6 where its compiled ops (``detectron2._C``) are absent.

A detectron2 installed from its Python sources alone (see
``tools/install_detectron2.sh``) has no ``detectron2._C``. Only rotated boxes,
deformable convolution and the fast COCO evaluator need it, yet
``detectron2.layers`` and ``detectron2.evaluation`` import it at module level.
:func:`ensure_detectron2_ops` registers a placeholder module in that case only;
a full build keeps its real ops. Any op looked up on the placeholder raises
:class:`MissingCompiledOpError` naming the op.

It also restores the numpy aliases (``np.float``, ``np.int``, ``np.bool``) that
numpy >= 1.24 removed and detectron2 0.6 still uses (polygon masks, evaluators).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["MissingCompiledOpError", "ensure_detectron2_ops", "using_placeholder_ops"]

_PLACEHOLDER_NAME = "detectron2._C"


class MissingCompiledOpError(RuntimeError):
    """A detectron2 compiled op was called, but detectron2 was built without them."""


class _PlaceholderOps(types.ModuleType):
    """Stands in for ``detectron2._C``; every op lookup fails with the op's name."""

    kd_placeholder = True

    def __init__(self):
        super().__init__(_PLACEHOLDER_NAME)
        self.__file__ = "<no compiled ops>"

    # collect_env_info() (called by default_setup) asks these of a real build.
    @staticmethod
    def get_compiler_version() -> str:
        return "none (detectron2 built without compiled ops)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none (detectron2 built without compiled ops)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingCompiledOpError(_missing_message(f"_C.{name}"))


def _missing_message(op: str) -> str:
    return (f"detectron2 compiled op '{op}' is not available: this detectron2 was installed without its "
            "C++/CUDA extension (rotated boxes, deformable convolution and the fast COCO evaluator need it). "
            "Build detectron2 from source to use it.")


# Ops detectron2 0.6 calls as torch.ops.detectron2.<name>, past the _C module (layers/nms.py).
_TORCH_OPS = ("nms_rotated",)


def _register_missing_torch_ops() -> None:
    import torch

    ns = torch.ops.detectron2
    for name in _TORCH_OPS:
        try:
            getattr(ns, name)
        except (AttributeError, RuntimeError):
            def missing(*args, _op=f"torch.ops.detectron2.{name}", **kwargs):
                raise MissingCompiledOpError(_missing_message(_op))

            setattr(ns, name, missing)


def _restore_numpy_aliases() -> None:
    import numpy as np

    for alias, value in (("bool", bool), ("float", float), ("int", int)):
        if alias not in vars(np):
            setattr(np, alias, value)


def ensure_detectron2_ops() -> bool:
    """Register the placeholder if ``detectron2._C`` cannot be imported.

    Returns True when the placeholder is in use. Safe to call many times.
    """
    _restore_numpy_aliases()
    existing = sys.modules.get(_PLACEHOLDER_NAME)
    if existing is not None:
        return bool(getattr(existing, "kd_placeholder", False))
    try:
        importlib.import_module(_PLACEHOLDER_NAME)
        return False
    except ImportError:
        pass
    placeholder = _PlaceholderOps()
    sys.modules[_PLACEHOLDER_NAME] = placeholder
    _register_missing_torch_ops()
    import detectron2

    detectron2._C = placeholder
    return True


def using_placeholder_ops() -> bool:
    mod = sys.modules.get(_PLACEHOLDER_NAME)
    return bool(mod is not None and getattr(mod, "kd_placeholder", False))
