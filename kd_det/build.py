"""From a config to a model: the plain student, or the student distilled from its teacher.

``build_kd_model(cfg)`` builds

* ``RCNNKD`` (mdistiller's name) when ``MODEL.META_ARCHITECTURE`` is ``RCNNKD``:
  a ``GeneralizedRCNN`` student with the methods of ``KD.TYPE``;
* a :class:`kd_det.distiller.DetectionDistiller` when ``KD.METHODS`` is not
  empty: the student is ``MODEL.META_ARCHITECTURE``'s detector;
* the plain detector otherwise (``KD.METHODS: []`` is plain training).

The teacher's weights come only from ``TEACHER.MODEL.WEIGHTS`` (loaded here)
or from a combined ``MODEL.WEIGHTS`` file (loaded later by the checkpointer);
with ``KD.ALLOW_RANDOM_TEACHER`` nothing is loaded for the teacher. ``KD.INHERIT``
then copies the teacher's neck/head into the student, before any
``MODEL.WEIGHTS`` or ``--resume`` load.
"""
from __future__ import annotations

import logging
from typing import List

import torch
from torch import nn

from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

from kd_cls.config import ConfigError
from kd_cls.nn.teacher import freeze

from .checkpoint import load_teacher_weights
from .distiller import DetectionDistiller
from .methods import KD_METHODS
from .pairing import DetectorPair, check_needs, inherit_keys
from .roi_align import use_fast_roi_align
from .teacher_cfg import build_teacher_cfg, kd_method_names

__all__ = ["build_kd_model", "build_teacher", "build_methods", "check_registered_names", "distiller_kwargs",
           "load_teacher_and_inherit", "validate_kd_model"]

logger = logging.getLogger("kd_det")
# Not 0: tests and users seed their own code with 0, and a student of the teacher's architecture built
# from the same seed would start equal to it.
RANDOM_TEACHER_SEED = 24301


def check_registered_names(cfg, who: str = "") -> None:
    """One-line errors for an unknown backbone or meta-architecture name (detectron2's do not list choices)."""
    for key, reg in (("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY), ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY)):
        name = cfg.MODEL.BACKBONE.NAME if key == "MODEL.BACKBONE.NAME" else cfg.MODEL.META_ARCHITECTURE
        if name not in reg:
            valid = ", ".join(sorted(k for k, _ in reg))
            raise ConfigError(f"unknown {who}{key} {name!r}. Valid choices: {valid}")


def build_teacher(teacher_cfg) -> nn.Module:
    """The teacher detector of its derived config, frozen."""
    check_registered_names(teacher_cfg, "TEACHER.")
    return freeze(META_ARCH_REGISTRY.get(teacher_cfg.MODEL.META_ARCHITECTURE)(teacher_cfg))


def build_methods(cfg, pair: DetectorPair, names: List[str]) -> List[nn.Module]:
    methods = []
    for name in names:
        cls = KD_METHODS.get(name)
        check_needs(cls, pair)
        methods.append(cls.from_config(cfg, pair))
    return methods


def distiller_kwargs(cfg, student_arch: str) -> dict:
    """The parts of a distiller for ``cfg``, its student built as ``student_arch``; weights loaded and inherited."""
    s_cfg = cfg
    if student_arch != cfg.MODEL.META_ARCHITECTURE:
        s_cfg = cfg.clone()
        s_cfg.defrost()
        s_cfg.MODEL.META_ARCHITECTURE = student_arch
    check_registered_names(s_cfg)
    student = META_ARCH_REGISTRY.get(student_arch)(s_cfg)
    tcfg = build_teacher_cfg(cfg)
    if cfg.KD.ALLOW_RANDOM_TEACHER:
        # A fixed seed, so that --resume re-creates the same random teacher (checkpoints do not hold it).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            teacher = build_teacher(tcfg)
    else:
        teacher = build_teacher(tcfg)
    teacher = teacher.to(student.device if hasattr(student, "device") else "cpu")
    pair = DetectorPair.build(student, teacher)
    methods = build_methods(cfg, pair, kd_method_names(cfg))
    return dict(student=student, teacher=teacher, methods=methods,
                allow_random_teacher=bool(cfg.KD.ALLOW_RANDOM_TEACHER),
                fold_teacher_bn=bool(cfg.KD.FOLD_TEACHER_BN), teacher_channels_last=bool(cfg.KD.TEACHER_CHANNELS_LAST))


def load_teacher_and_inherit(model, cfg) -> None:
    weights = cfg.TEACHER.MODEL.WEIGHTS
    if cfg.KD.ALLOW_RANDOM_TEACHER:
        model.teacher_source = {"random_seed": RANDOM_TEACHER_SEED}
        if weights:
            logger.warning(f"KD.ALLOW_RANDOM_TEACHER is on: TEACHER.MODEL.WEIGHTS {weights} is not loaded")
    elif weights:
        load_teacher_weights(model, weights)
    parts = list(cfg.KD.INHERIT)
    if parts:
        if not weights and not cfg.KD.ALLOW_RANDOM_TEACHER:
            raise ConfigError(f"KD.INHERIT {parts} copies the teacher's weights when the model is built, so the "
                              "teacher must come from TEACHER.MODEL.WEIGHTS (a combined MODEL.WEIGHTS is loaded later)")
        keys = inherit_keys(model.pair, parts)
        logger.info(f"KD.INHERIT {parts}: {len(keys)} tensors copied from the teacher into the student")


def validate_kd_model(cfg) -> None:
    """Build the student, the teacher and the methods on the meta device (no memory, no weights read),
    so that a method a family cannot serve, FPNs without a common level or a ``KD.INHERIT`` mismatch
    stop before anything is written."""
    names = kd_method_names(cfg)
    check_registered_names(cfg)
    if not names:
        return
    arch = "GeneralizedRCNN" if cfg.MODEL.META_ARCHITECTURE == "RCNNKD" else cfg.MODEL.META_ARCHITECTURE
    with torch.device("meta"):
        parts = distiller_kwargs(cfg, arch)
        if cfg.KD.INHERIT:
            inherit_keys(DetectorPair.build(parts["student"], parts["teacher"]), list(cfg.KD.INHERIT), copy=False)


def build_kd_model(cfg) -> nn.Module:
    """The model ``cfg`` describes (see the module docstring), on ``cfg.MODEL.DEVICE``.

    With ``KD.FAST_ROI_ALIGN`` its RoIAlign layers get the fast CPU backward (:mod:`kd_det.roi_align`).
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch != "RCNNKD" and kd_method_names(cfg):
        model = DetectionDistiller(**distiller_kwargs(cfg, arch))
        load_teacher_and_inherit(model, cfg)
    else:  # a plain detector, or RCNNKD (kd_det.mdistiller), which builds its distiller from cfg itself
        check_registered_names(cfg)
        model = META_ARCH_REGISTRY.get(arch)(cfg)
    if cfg.KD.FAST_ROI_ALIGN:
        use_fast_roi_align(model)
    return model.to(torch.device(cfg.MODEL.DEVICE))  # as detectron2's build_model: the KD modules too
