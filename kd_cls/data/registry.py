"""Dataset registry: what each dataset is, and how to build its loaders.

``DatasetInfo`` holds the facts other code needs without touching the data
(class count, training-set size, input size, model family). A data module
registers one per dataset together with its loader builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from kd_cls.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    num_train: int  # training-set size: the default CRD memory size
    image_size: int  # input side in pixels
    model_family: str  # "cifar", "imagenet" or "tiny_imagenet" (see kd_cls.models)
    # build(cfg, with_contrastive: bool) -> (train_loader, val_loader, num_data, num_classes)
    build: Optional[Callable] = None
    # build_val(cfg, batch_size) -> val_loader (tools/eval.py)
    build_val: Optional[Callable] = None


DATASETS = Registry("dataset")


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS.register(info.name, info)
    return info


def get_dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)
