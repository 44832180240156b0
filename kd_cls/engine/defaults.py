"""The full classification config, assembled at the top (detectron2's ``add_x_config`` pattern).

``get_cfg()`` = :func:`kd_cls.config.base_cfg` + every registered method's node
(``add_config`` next to each distiller) + the DOT optimizer's ``SOLVER.DOT``.
"""
from __future__ import annotations

from kd_cls.config import CfgNode, base_cfg
from kd_cls.distillers import add_distiller_configs
from kd_cls.optim import add_dot_config

__all__ = ["get_cfg"]


def get_cfg() -> CfgNode:
    """A fresh config of defaults, in mdistiller's schema, including every method's node."""
    cfg = base_cfg()
    add_distiller_configs(cfg)
    add_dot_config(cfg)
    return cfg
