"""The teacher's config, derived from the student's, and the method list a config names.

The ``TEACHER`` node holds only overrides. The teacher's full config is built
by :func:`build_teacher_cfg`, in this order (later wins):

1. detectron2's defaults (plus this package's additions);
2. ``TEACHER.CONFIG_FILE``, if set: any detectron2 config file, or a model-zoo
   name such as ``COCO-Detection/retinanet_R_101_FPN_3x.yaml`` (an existing
   file wins; relative paths are tried from the working directory, then from
   the directory of each file of the student config's ``_BASE_`` chain);
3. every key given under ``TEACHER`` (``TEACHER.MODEL.RESNETS.DEPTH: 101``...).
   The four declared keys ``TEACHER.MODEL.WEIGHTS``, ``TEACHER.MODEL.PIXEL_MEAN``,
   ``TEACHER.MODEL.PIXEL_STD`` and ``TEACHER.INPUT.FORMAT`` apply only where they
   differ from detectron2's defaults, so they do not mask a teacher config file;
4. keys shared with the student: ``MODEL.DEVICE``, ``DATASETS.TRAIN/TEST`` and
   the class count, read and set per family (``MODEL.ROI_HEADS``,
   ``MODEL.RETINANET`` or ``MODEL.FCOS`` ``.NUM_CLASSES``; a teacher that sets a
   different count is an error).

``MODEL.WEIGHTS`` of the teacher config is ``TEACHER.MODEL.WEIGHTS``: a
``MODEL.WEIGHTS`` inside ``TEACHER.CONFIG_FILE`` is that recipe's ImageNet
initialisation and is never loaded into the teacher.
"""
from __future__ import annotations

import copy
import os
from typing import List, Optional, Sequence, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _d2_get_cfg

from kd_cls.config import ConfigError, config_file_chain, config_key_error

from .defaults import d2_defaults
from .methods import KD_METHODS
from .pairing import family_of_arch, num_classes_key

__all__ = ["KD_TYPES", "build_teacher_cfg", "kd_method_names", "kd_type_methods",
           "resolve_teacher_config_file"]

#: mdistiller's ``KD.TYPE`` values and the methods each one runs.
KD_TYPES = {"ReviewKD": ("ReviewKD",), "DKD": ("DKD",), "ReviewDKD": ("ReviewKD", "DKD")}

# TEACHER keys that exist before any file is merged; they count as teacher
# overrides only when they differ from detectron2's default.
_DECLARED_TEACHER_KEYS = (("MODEL", "WEIGHTS"), ("MODEL", "PIXEL_MEAN"), ("MODEL", "PIXEL_STD"), ("INPUT", "FORMAT"))
_OWN_TEACHER_KEYS = ("CONFIG_FILE",)


def kd_type_methods(kd_type: str) -> Tuple[str, ...]:
    if kd_type not in KD_TYPES:
        raise ConfigError(f"unknown KD.TYPE {kd_type!r}. Valid choices: {', '.join(KD_TYPES)}")
    return KD_TYPES[kd_type]


def kd_method_names(cfg) -> List[str]:
    """The methods a config runs: ``KD_TYPES[KD.TYPE]`` for ``RCNNKD``, else ``KD.METHODS`` (names checked)."""
    methods = list(cfg.KD.METHODS)
    if cfg.MODEL.META_ARCHITECTURE == "RCNNKD":
        if methods:
            raise ConfigError(f"MODEL.META_ARCHITECTURE RCNNKD takes its methods from KD.TYPE, but KD.METHODS is "
                              f"{methods}: with KD.METHODS set the student's own architecture (GeneralizedRCNN)")
        return list(kd_type_methods(cfg.KD.TYPE))
    for name in methods:
        if name not in KD_METHODS:
            raise ConfigError(f"KD.METHODS: {KD_METHODS.unknown_message(name)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"KD.METHODS lists a method twice: {methods}")
    return methods


def resolve_teacher_config_file(name: str, chain_files: Sequence[str] = ()) -> str:
    """An existing path for ``TEACHER.CONFIG_FILE`` (see the module docstring), or a one-line error."""
    candidates = [name] + [os.path.join(os.path.dirname(f), name) for f in chain_files if not os.path.isabs(name)]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    try:
        from detectron2 import model_zoo

        path = model_zoo.get_config_file(name)
        if os.path.isfile(path):
            return path
    except Exception:  # not a model-zoo name (or the zoo configs are not installed)
        pass
    raise FileNotFoundError(f"TEACHER.CONFIG_FILE not found: {name} (not a file, relative to the working directory "
                            "or the config file, nor a detectron2 model-zoo name such as "
                            "COCO-Detection/retinanet_R_50_FPN_3x.yaml)")


def _teacher_overrides(cfg: CN) -> CN:
    """The TEACHER node without this package's own keys and without unchanged declared defaults."""
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


def _get(node, dotted: str):
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            raise KeyError(dotted)
        node = node[k]
    return node


def _set(node, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        node = node[k]
    node[last] = value


def _explicit_num_classes(key: str, sources) -> Optional[int]:
    for src in sources:
        try:
            return int(_get(src, key))
        except KeyError:
            continue
    return None


def build_teacher_cfg(cfg: CN) -> CN:
    """The teacher's full detectron2 config, derived from the student's ``cfg`` (frozen)."""
    t = d2_defaults()
    file_dicts: List[dict] = []
    if cfg.TEACHER.CONFIG_FILE:
        path = resolve_teacher_config_file(cfg.TEACHER.CONFIG_FILE)
        file_dicts = [d for _, d in config_file_chain(path)]
        try:
            t.merge_from_file(path)
        except (KeyError, AssertionError, ValueError) as e:
            raise config_key_error(t, e, where=f"TEACHER.CONFIG_FILE {path}") from None
    try:
        t.merge_from_other_cfg(_teacher_overrides(cfg))
    except (KeyError, AssertionError) as e:
        raise ConfigError("bad teacher override under TEACHER: " + str(config_key_error(t, e))) from None

    if t.MODEL.META_ARCHITECTURE == "RCNNKD":
        raise ConfigError("the teacher's MODEL.META_ARCHITECTURE is 'RCNNKD'; a teacher is a plain detector, "
                          "e.g. 'GeneralizedRCNN' (set TEACHER.MODEL.META_ARCHITECTURE)")
    t.MODEL.WEIGHTS = cfg.TEACHER.MODEL.WEIGHTS
    t.MODEL.DEVICE = cfg.MODEL.DEVICE
    t.DATASETS.TRAIN = tuple(cfg.DATASETS.TRAIN)
    t.DATASETS.TEST = tuple(cfg.DATASETS.TEST)
    s_key = num_classes_key(family_of_arch(cfg.MODEL.META_ARCHITECTURE))
    t_key = num_classes_key(family_of_arch(t.MODEL.META_ARCHITECTURE))
    student_classes = int(_get(cfg, s_key))
    explicit = _explicit_num_classes(t_key.split(".", 1)[1], [cfg.TEACHER.MODEL] + [d.get("MODEL", {}) for d in file_dicts])
    if explicit is not None and explicit != student_classes:
        raise ConfigError(f"class-count mismatch: teacher {t_key}={explicit} but the student's {s_key} is "
                          f"{student_classes}; teacher and student must predict the same classes")
    for key in ("MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES", "MODEL.FCOS.NUM_CLASSES"):
        _set(t, key, student_classes)
    t.freeze()
    return t
