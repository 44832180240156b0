"""Datasets: the generated shapes set under its own names, and COCO-json sets named in a config."""
from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from kd_det.data.shapes import SHAPES, make_shapes_dataset, split_paths

__all__ = [
    "make_shapes_dataset",
    "register_builtin_coco",
    "register_coco_json",
    "register_config_datasets",
    "register_shapes",
]


def register_coco_json(name: str, json_file: str, image_root: str, hint: str = "", overwrite: bool = False) -> None:
    """Register a COCO-format instances json under ``name`` (lazy; a missing file fails at load, by name).

    An existing registration is kept unless ``overwrite``.
    """
    if name in DatasetCatalog.list():
        if not overwrite:
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    def load():
        for p in (json_file, image_root):
            if not os.path.exists(p):
                raise FileNotFoundError(f"dataset {name!r}: {p} not found{hint}")
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def register_shapes(root: str = None) -> None:
    """Register ``shapes_train`` / ``shapes_val`` at ``<root>/shapes`` (root: $DETECTRON2_DATASETS or ./datasets)."""
    root = root or os.environ.get("DETECTRON2_DATASETS", "datasets")
    for split in ("train", "val"):
        json_file, image_root = split_paths(root, "shapes", split)
        register_coco_json(
            f"shapes_{split}",
            json_file,
            image_root,
            hint=f" (generate it: python tools/make_shapes_dataset.py --root {root})",
            overwrite=True,
        )
        MetadataCatalog.get(f"shapes_{split}").set(thing_classes=list(SHAPES))


def register_config_datasets(cfg) -> None:
    """Register every ``[name, json_file, image_root]`` of ``cfg.DATASETS.COCO_JSON``."""
    for entry in cfg.DATASETS.get("COCO_JSON", []):
        if len(entry) != 3:
            raise ValueError(f"DATASETS.COCO_JSON entries are [name, json_file, image_root]; got {list(entry)}")
        register_coco_json(*entry)


register_shapes()


def register_builtin_coco(root: str = None, splits=("train", "val")) -> None:
    """(Re-)register detectron2's ``coco_2017_<split>`` names at ``<root>/coco`` (root: $DETECTRON2_DATASETS).

    detectron2 reads ``DETECTRON2_DATASETS`` once, when ``detectron2.data`` is first
    imported; call this after changing it in a running process.
    """
    from detectron2.data.datasets import register_coco_instances
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    root = root or os.environ.get("DETECTRON2_DATASETS", "datasets")
    for split in splits:
        name = f"coco_2017_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        json_file, image_root = split_paths(root, "coco", split)
        register_coco_instances(name, _get_builtin_metadata("coco"), json_file, image_root)
