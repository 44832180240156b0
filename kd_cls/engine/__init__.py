"""Training engine, the top of ``kd_cls``: the full config, the trainer (a loop with hooks),
run checkpoints, metrics, logging, DDP and the command lines."""
from .defaults import get_cfg

__all__ = ["get_cfg"]
