"""Trainers, one family per file; each registers itself in ``TRAINERS`` (``SOLVER.TRAINER``)."""
from kd_cls.registry import import_submodules as _import_submodules

from .base import AMP_DTYPES, TRAINERS, BaseTrainer, CRDTrainer, get_trainer, seed_everything

_import_submodules(__name__, __path__)

__all__ = ["AMP_DTYPES", "TRAINERS", "BaseTrainer", "CRDTrainer", "get_trainer", "seed_everything"]
