"""Datasets. Each module registers its ``DatasetInfo`` (see ``registry``)."""
from kd_cls.registry import import_submodules as _import_submodules

from .registry import DATASETS, DatasetInfo, get_dataset_info, register_dataset

_import_submodules(__name__, __path__)
