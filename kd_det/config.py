"""Config for detection distillation: ``add_kd_config`` and the derived teacher config.

Keys keep mdistiller's names (``KD.TYPE``, ``KD.DKD.*``, ``KD.REVIEWKD.*``,
``TEACHER.*``, ``MODEL.MOBILENETV2.*``) so its detection configs load unchanged.

The ``TEACHER`` node holds only overrides. The teacher's full config is built
by :func:`build_teacher_cfg`, in this order (later wins):

1. detectron2's defaults (plus this module's additions);
2. ``TEACHER.CONFIG_FILE``, if set (any detectron2 config file);
3. every key given under ``TEACHER`` (``TEACHER.MODEL.RESNETS.DEPTH: 101``...).
   The four declared keys ``TEACHER.MODEL.WEIGHTS``, ``TEACHER.MODEL.PIXEL_MEAN``,
   ``TEACHER.MODEL.PIXEL_STD`` and ``TEACHER.INPUT.FORMAT`` apply only where they
   differ from detectron2's defaults, so they do not mask a teacher config file;
4. keys shared with the student: ``MODEL.DEVICE``, ``DATASETS.TRAIN/TEST`` and
   the number of classes (a teacher that sets a different count is an error).
"""
from __future__ import annotations

import copy
import os
from typing import List, Optional, Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _d2_get_cfg

from kd_cls.config import ConfigError
from kd_det.modeling.fcos import add_fcos_config

__all__ = [
    "ConfigError",
    "add_kd_config",
    "build_teacher_cfg",
    "get_kd_cfg",
    "merge_kd_opts",
    "KD_TYPES",
]

#: Valid ``KD.TYPE`` values and the methods each one runs.
KD_TYPES = {"ReviewKD": ("ReviewKD",), "DKD": ("DKD",), "ReviewDKD": ("ReviewKD", "DKD")}

# TEACHER keys that exist before any file is merged; they count as teacher
# overrides only when they differ from detectron2's default.
_DECLARED_TEACHER_KEYS = (
    ("MODEL", "WEIGHTS"),
    ("MODEL", "PIXEL_MEAN"),
    ("MODEL", "PIXEL_STD"),
    ("INPUT", "FORMAT"),
)
_OWN_TEACHER_KEYS = ("CONFIG_FILE",)


def add_kd_config(cfg: CN) -> CN:
    """Add the KD, TEACHER, MODEL.MOBILENETV2 and DATASETS.COCO_JSON nodes to a detectron2 cfg.

    Also adds ``MODEL.FCOS`` (:func:`kd_det.modeling.fcos.add_fcos_config`).
    Idempotent: a cfg that already has the nodes is returned unchanged.
    """
    add_fcos_config(cfg)
    if "KD" in cfg and "TEACHER" in cfg:
        return cfg
    d2 = _d2_get_cfg()

    cfg.MODEL.MOBILENETV2 = CN()
    cfg.MODEL.MOBILENETV2.OUT_FEATURES = ["m2"]
    cfg.MODEL.MOBILENETV2.NORM = "FrozenBN"
    cfg.MODEL.MOBILENETV2.WIDTH_MULT = 1.0

    # Extra COCO-json datasets: [[name, json_file, image_root], ...], registered at start-up.
    cfg.DATASETS.COCO_JSON = []

    cfg.KD = CN()
    cfg.KD.TYPE = "DKD"
    # Tests and benchmarks only: train against a teacher whose weights were never loaded.
    cfg.KD.ALLOW_RANDOM_TEACHER = False
    # Speed only, results equal within float rounding: the teacher runs from an
    # inference copy with its frozen BNs folded into the convolutions, in NHWC.
    cfg.KD.FOLD_TEACHER_BN = True
    cfg.KD.TEACHER_CHANNELS_LAST = True
    # Speed only, gradients equal within float rounding: RoIAlign's CPU backward
    # as one sparse product (kd_det.roi_align), for every detector built here.
    cfg.KD.FAST_ROI_ALIGN = True
    cfg.KD.DKD = CN()
    cfg.KD.DKD.ALPHA = 1.0
    cfg.KD.DKD.BETA = 0.25
    cfg.KD.DKD.T = 1.0
    cfg.KD.REVIEWKD = CN()
    cfg.KD.REVIEWKD.LOSS_WEIGHT = 1.0
    # ABF width; 0 takes the student's FPN channel count.
    cfg.KD.REVIEWKD.MID_CHANNELS = 0
    # Per-level channels of student / teacher FPN. Empty: read from the built
    # models. If set, they must match the models (a guard for copied configs).
    cfg.KD.REVIEWKD.IN_CHANNELS = []
    cfg.KD.REVIEWKD.OUT_CHANNELS = []

    cfg.TEACHER = CN(new_allowed=True)
    cfg.TEACHER.CONFIG_FILE = ""
    cfg.TEACHER.MODEL = CN(new_allowed=True)
    cfg.TEACHER.MODEL.WEIGHTS = ""
    cfg.TEACHER.MODEL.PIXEL_MEAN = list(d2.MODEL.PIXEL_MEAN)
    cfg.TEACHER.MODEL.PIXEL_STD = list(d2.MODEL.PIXEL_STD)
    cfg.TEACHER.INPUT = CN(new_allowed=True)
    cfg.TEACHER.INPUT.FORMAT = d2.INPUT.FORMAT
    return cfg


def _d2_defaults() -> CN:
    cfg = _d2_get_cfg()
    add_kd_config(cfg)
    return cfg


def _lookup(node, keys: Sequence[str]):
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise KeyError(".".join(keys))
        node = node[k]
    return node


def merge_kd_opts(cfg: CN, opts: Optional[List[str]]) -> CN:
    """``cfg.merge_from_list(opts)`` that also accepts ``TEACHER.<any detectron2 key>``.

    A ``TEACHER.X.Y`` key not yet in ``cfg`` is created when ``X.Y`` is a valid
    detectron2 key; otherwise the error names the key.
    """
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number of items: {' '.join(opts)}")
    defaults = None
    for key in opts[0::2]:
        parts = key.split(".")
        if parts[0] != "TEACHER" or len(parts) < 2:
            continue
        try:
            _lookup(cfg, parts)
            continue
        except KeyError:
            pass
        defaults = defaults or _d2_defaults()
        try:
            default = _lookup(defaults, parts[1:])
        except KeyError:
            raise ConfigError(
                f"unknown config key {key!r}: {'.'.join(parts[1:])!r} is not a detectron2 config key"
            ) from None
        node = cfg.TEACHER
        for p in parts[1:-1]:
            if p not in node:
                node[p] = CN(new_allowed=True)
            node = node[p]
        node[parts[-1]] = copy.deepcopy(default)
    _merge_list(cfg, opts)
    cfg.TEACHER.set_new_allowed(True)
    return cfg


def _merge_list(cfg: CN, opts: List[str]) -> None:
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError) as e:
        raise ConfigError(str(e.args[0] if e.args else e)) from None


def get_kd_cfg(config_file: Optional[str] = None, opts: Optional[List[str]] = None, freeze: bool = True) -> CN:
    """detectron2's defaults + :func:`add_kd_config` + a config file + ``KEY VALUE`` overrides.

    Validates ``KD.TYPE`` and the teacher config (see :func:`build_teacher_cfg`).
    """
    cfg = _d2_defaults()
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise ConfigError(f"{config_file}: {e.args[0] if e.args else e}") from None
        cfg.TEACHER.set_new_allowed(True)
    merge_kd_opts(cfg, opts)
    check_kd_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def check_kd_cfg(cfg: CN) -> None:
    """Raise ConfigError for an unknown KD.TYPE; build the teacher config to validate it."""
    if cfg.MODEL.META_ARCHITECTURE != "RCNNKD":
        return
    kd_type_methods(cfg.KD.TYPE)
    build_teacher_cfg(cfg)


def kd_type_methods(kd_type: str):
    if kd_type not in KD_TYPES:
        raise ConfigError(f"unknown KD.TYPE {kd_type!r}. Valid choices: {', '.join(KD_TYPES)}")
    return KD_TYPES[kd_type]


def _teacher_overrides(cfg: CN) -> CN:
    """The TEACHER node without this project's own keys and without unchanged declared defaults."""
    over = copy.deepcopy(cfg.TEACHER)
    over.defrost()
    for k in _OWN_TEACHER_KEYS:
        over.pop(k, None)
    d2 = _d2_get_cfg()
    for node, key in _DECLARED_TEACHER_KEYS:
        if node in over and key in over[node] and _same(over[node][key], d2[node][key]):
            over[node].pop(key)
    return over


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _explicit_num_classes(cfg: CN, teacher_file_dict: Optional[dict]) -> Optional[int]:
    for src in (cfg.TEACHER, teacher_file_dict or {}):
        try:
            return int(_lookup(src, ("MODEL", "ROI_HEADS", "NUM_CLASSES")))
        except KeyError:
            continue
    return None


def build_teacher_cfg(cfg: CN) -> CN:
    """The teacher's full detectron2 config, derived from the student's ``cfg`` (frozen)."""
    t = _d2_defaults()
    file_dict = None
    if cfg.TEACHER.CONFIG_FILE:
        path = cfg.TEACHER.CONFIG_FILE
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TEACHER.CONFIG_FILE not found: {path}")
        file_dict = CN.load_yaml_with_base(path, allow_unsafe=True)
        try:
            t.merge_from_file(path)
        except KeyError as e:
            raise ConfigError(f"TEACHER.CONFIG_FILE {path}: {e.args[0] if e.args else e}") from None
    try:
        t.merge_from_other_cfg(_teacher_overrides(cfg))
    except KeyError as e:
        msg = str(e.args[0] if e.args else e)
        raise ConfigError(f"bad teacher override under TEACHER: {msg}") from None

    if t.MODEL.META_ARCHITECTURE == "RCNNKD":
        raise ConfigError(
            "the teacher's MODEL.META_ARCHITECTURE is 'RCNNKD'; a teacher is a plain detector, "
            "e.g. 'GeneralizedRCNN' (set TEACHER.MODEL.META_ARCHITECTURE)"
        )
    t.MODEL.DEVICE = cfg.MODEL.DEVICE
    t.DATASETS.TRAIN = tuple(cfg.DATASETS.TRAIN)
    t.DATASETS.TEST = tuple(cfg.DATASETS.TEST)
    student_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    explicit = _explicit_num_classes(cfg, file_dict)
    if explicit is not None and explicit != student_classes:
        raise ConfigError(
            f"class-count mismatch: teacher MODEL.ROI_HEADS.NUM_CLASSES={explicit} but the student has "
            f"{student_classes}; teacher and student must predict the same classes"
        )
    t.MODEL.ROI_HEADS.NUM_CLASSES = student_classes
    t.MODEL.RETINANET.NUM_CLASSES = student_classes
    t.freeze()
    return t
