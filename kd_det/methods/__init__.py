"""Detection KD methods. One file per method; each registers itself with ``@register_kd_method``.

A method is an ``nn.Module`` built by ``Method.from_models(cfg, student, teacher)``.
It declares what it needs (``NEEDS_ROI_LOGITS``) and returns its losses from
``forward(inputs: KDInputs) -> {"loss_<name>": scalar}``. ``ATTR`` is the
attribute name under which ``RCNNKD`` holds it, which fixes its parameter names
in checkpoints (mdistiller's ReviewKD lives at ``kd_trans``).
"""
from kd_cls.registry import import_submodules as _import_submodules

from .base import KD_METHODS, KDInputs, register_kd_method

_import_submodules(__name__, __path__)

__all__ = ["KD_METHODS", "KDInputs", "register_kd_method"]
