"""Optimizers. ``DOT`` is the distillation-oriented trainer (ICCV 2023)."""
from .dot import DOT, add_dot_config

__all__ = ["DOT", "add_dot_config"]
