"""Checks ``tools/train_net.py`` runs before detectron2 creates ``OUTPUT_DIR``.

So a bad dataset name, a missing weights file or a teacher that would never be
loaded stops with one line and leaves nothing behind (detectron2's
``default_setup`` writes the output folder first, and its loaders read the
data only after the model is built).
"""
from __future__ import annotations

import difflib
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from kd_cls.checkpoint_io import CheckpointError
from kd_cls.config import ConfigError
from kd_cls.registry import UnknownNameError

from .build import validate_kd_model
from .distiller import TeacherNotLoadedError
from .teacher_cfg import kd_method_names

__all__ = ["check_detection_run", "USER_ERRORS"]

_REMOTE = ("detectron2://", "http://", "https://", "catalog://", "s3://", "gs://")


def _check_dataset(name: str, key: str) -> None:
    names = DatasetCatalog.list()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: unknown dataset {name!r}.{hint} Register it (DATASETS.COCO_JSON: "
                          "[[name, json_file, image_root]]) or use a registered name such as coco_2017_train")
    meta = MetadataCatalog.get(name)
    for attr in ("json_file", "image_root"):
        path = meta.as_dict().get(attr)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{key}: dataset {name!r} needs {path}, which does not exist "
                                    "(set DETECTRON2_DATASETS to the folder that holds coco/, or fix DATASETS.COCO_JSON)")


def _has_last_checkpoint(cfg) -> bool:
    return os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def _holds_teacher(path: str) -> bool:
    """Whether a weights file holds a teacher under ``teacher.`` (mdistiller's combined layout)."""
    from detectron2.checkpoint import DetectionCheckpointer

    try:
        data = DetectionCheckpointer(None)._load_file(path)
    except Exception as e:  # a file detectron2 cannot read at all
        raise CheckpointError(f"MODEL.WEIGHTS {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    state = data.get("model", data) if isinstance(data, dict) else {}
    return any(str(k).startswith("teacher.") for k in state)


def check_detection_run(cfg, resume: bool = False, eval_only: bool = False) -> None:
    """Raise a one-line error for what would fail after ``OUTPUT_DIR`` exists (see the module docstring)."""
    validate_kd_model(cfg)
    if not eval_only:
        for name in cfg.DATASETS.TRAIN:
            _check_dataset(name, "DATASETS.TRAIN")
    for name in cfg.DATASETS.TEST:
        _check_dataset(name, "DATASETS.TEST")
    resuming = resume and _has_last_checkpoint(cfg)
    weights = cfg.MODEL.WEIGHTS
    local_weights = bool(weights) and not weights.startswith(_REMOTE)
    if local_weights and not resuming and not os.path.isfile(weights):
        what = "a teacher+student file, teacher under 'teacher.'" if cfg.MODEL.META_ARCHITECTURE == "RCNNKD" \
            else "the student's initial weights"
        raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights} ({what}); put it there, or set "
                                "MODEL.WEIGHTS '' to start from random weights")
    distilling = cfg.MODEL.META_ARCHITECTURE == "RCNNKD" or bool(kd_method_names(cfg))
    if eval_only or not distilling or cfg.KD.ALLOW_RANDOM_TEACHER or resuming:
        return
    teacher = cfg.TEACHER.MODEL.WEIGHTS
    if teacher:
        if not teacher.startswith(_REMOTE) and not os.path.isfile(teacher):
            raise FileNotFoundError(f"TEACHER.MODEL.WEIGHTS file not found: {teacher} (put the teacher's "
                                    "detectron2 .pkl/.pth there)")
        return
    if not (local_weights and _holds_teacher(weights)):
        raise ConfigError("the teacher would not be loaded: set TEACHER.MODEL.WEIGHTS to the teacher's detectron2 "
                          ".pkl/.pth, or MODEL.WEIGHTS to a teacher+student file with the teacher under 'teacher.' "
                          f"(MODEL.WEIGHTS is {weights or 'empty'}); KD.ALLOW_RANDOM_TEACHER True trains against "
                          "a random teacher (tests only)")


#: Expected failures of a detection run: tools/train_net.py prints them as one ``error:`` line, exit 2.
USER_ERRORS = (ConfigError, UnknownNameError, FileNotFoundError, CheckpointError, TeacherNotLoadedError)
