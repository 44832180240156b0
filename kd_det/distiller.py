"""``DetectionDistiller``: any detectron2 detector distilled from a frozen teacher of any family.

The student is the config's own detector (``MODEL.META_ARCHITECTURE``:
``GeneralizedRCNN``, ``RetinaNet``, ``FCOS``, ...), the teacher the detector of
the derived teacher config (:func:`kd_det.teacher_cfg.build_teacher_cfg`); the
distiller composes the two and subclasses neither. A training step is:

1. the student's own forward, which returns its detection losses, while forward
   hooks record what the methods declared they need (:mod:`kd_det.inputs`);
2. each method of ``KD.METHODS`` adds its losses (``loss_<name>...``), reading a
   :class:`kd_det.inputs.KDInputs` whose teacher parts are computed once, on
   first use, under ``inference_mode`` from the teacher's BN-folded copy.

Inference (``eval()``) runs the student alone.

Parameter names keep mdistiller's ``RCNNKD`` layout: the student's keys at the
top level (exactly the plain detector's), the teacher under ``teacher.``, each
method under its ``ATTR`` (ReviewKD under ``kd_trans.``). So ``model_final.pth``
loads into the plain detector of the student's family, and mdistiller's
combined files load here.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from torch import nn

from detectron2.structures import ImageList

from kd_cls.config import ConfigError
from kd_cls.nn.teacher import FrozenTeacher

from .fast import fold_detectron2_norms
from .inputs import KDInputs, StudentRecorder
from .methods.base import BOTTOM_UP, DENSE_HEAD, FPN, ROI_LOGITS
from .pairing import DetectorPair

__all__ = ["DetectionDistiller", "TeacherNotLoadedError"]

logger = logging.getLogger("kd_det")


class TeacherNotLoadedError(RuntimeError):
    """KD is on but the teacher's weights were never loaded."""


class DetectionDistiller(nn.Module):
    """Student + frozen teacher + KD methods (see the module docstring)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, methods: Sequence[nn.Module],
                 allow_random_teacher: bool = False, fold_teacher_bn: bool = True,
                 teacher_channels_last: bool = True):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.pair = DetectorPair.build(student, teacher)
        # Not a submodule: the inference copies stay out of state_dict(), parameters() and .to().
        self.__dict__["frozen_teacher"] = FrozenTeacher(
            teacher, fold_bn=fold_teacher_bn, channels_last=teacher_channels_last, folder=fold_detectron2_norms)
        self._kd_attrs: List[str] = []
        for m in methods:
            if m.ATTR in self._modules or hasattr(type(self), m.ATTR):
                raise ConfigError(f"KD method {m.NAME} is listed twice in KD.METHODS")
            setattr(self, m.ATTR, m)
            self._kd_attrs.append(m.ATTR)
        needs = {n for m in methods for n in m.NEEDS}
        self.records_bottom_up = BOTTOM_UP in needs
        self._single_taps = {"fpn": "backbone"} if needs & {FPN, DENSE_HEAD, ROI_LOGITS} else {}
        if BOTTOM_UP in needs:
            self._single_taps["bottom_up"] = "backbone.bottom_up"
        if ROI_LOGITS in needs:
            self._single_taps.update(roi_heads="roi_heads", box_predictor="roi_heads.box_predictor")
        if DENSE_HEAD in needs:
            self._single_taps.update(head="head", anchor_generator="anchor_generator")
        self._multi_taps = [p for m in methods for p in m.student_taps()]
        self._recorder = None  # hooks attached on the first training step
        self._check_formats()
        self.allow_random_teacher = allow_random_teacher
        # Where the teacher's weights came from ({"path", "sha256"} or {"random_seed"}): what checkpoints
        # record instead of the frozen tensors (kd_det.checkpoint).
        self.teacher_source = None
        self._teacher_keys = frozenset(teacher.state_dict().keys())
        self._teacher_loaded_keys: set = set()
        self._register_state_dict_hook(DetectionDistiller._flatten_student_keys)
        self.register_load_state_dict_pre_hook(DetectionDistiller._nest_student_keys)
        self.register_load_state_dict_post_hook(DetectionDistiller._record_teacher_keys)

    # ------------------------------------------------------------------ plain-detector view
    def __getattr__(self, name: str):
        # Attributes the distiller lacks are the student's (backbone, roi_heads, input_format, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self._modules.get("student")
            if student is None:
                raise
            return getattr(student, name)

    @property
    def device(self) -> torch.device:
        return self.student.pixel_mean.device

    @property
    def kd_methods(self) -> Dict[str, nn.Module]:
        return {getattr(self, a).NAME: getattr(self, a) for a in self._kd_attrs}

    def _check_formats(self) -> None:
        s_fmt = getattr(self.student, "input_format", "BGR")
        t_fmt = getattr(self.teacher, "input_format", "BGR")
        if s_fmt != t_fmt and {s_fmt, t_fmt} != {"RGB", "BGR"}:
            raise ConfigError(f"teacher INPUT.FORMAT {t_fmt!r} vs student {s_fmt!r}: only RGB <-> BGR can be converted")
        self._flip_for_teacher = s_fmt != t_fmt

    @property
    def teacher_input_format(self) -> str:
        return getattr(self.teacher, "input_format", "BGR")

    # ------------------------------------------------------------------ state dict layout
    def _kd_prefixes(self, prefix: str) -> tuple:
        return tuple(f"{prefix}{n}." for n in ["student", "teacher"] + self._kd_attrs)

    @staticmethod
    def _flatten_student_keys(module, state_dict, prefix, local_metadata):
        # In place, keeping the order: a parent (DDP) ignores a returned dict.
        head = prefix + "student."
        items = list(state_dict.items())
        state_dict.clear()
        for k, v in items:
            state_dict[prefix + k[len(head):] if k.startswith(head) else k] = v
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None:  # version records of the student's modules, keyed like their tensors
            for k in [k for k in meta if k == head[:-1] or k.startswith(head)]:
                meta[prefix + k[len(head):] if k != head[:-1] else prefix[:-1]] = meta.pop(k)
        return state_dict

    @staticmethod
    def _nest_student_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        own = module._kd_prefixes(prefix)
        items = list(state_dict.items())
        state_dict.clear()
        for k, v in items:
            nest = k.startswith(prefix) and not k.startswith(own)
            state_dict[prefix + "student." + k[len(prefix):] if nest else k] = v
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None:
            own_meta = tuple(p[:-1] for p in own)
            for k in [k for k in meta if k.startswith(prefix) and k != prefix[:-1]
                      and not k.startswith(own_meta)]:
                meta.setdefault(prefix + "student." + k[len(prefix):], meta[k])

    @staticmethod
    def _record_teacher_keys(module, incompatible) -> None:
        missing = {k.split("teacher.", 1)[1] for k in incompatible.missing_keys if "teacher." in k}
        module._teacher_loaded_keys |= set(module._teacher_keys) - missing

    def student_state_dict(self) -> Dict[str, torch.Tensor]:
        """The state dict of the plain detector of the student's family (what ``model_student.pth`` holds)."""
        return self.student.state_dict()

    def kd_module_names(self) -> List[str]:
        """Top-level names that exist only for distillation."""
        return ["teacher"] + list(self._kd_attrs)

    # ------------------------------------------------------------------ the teacher's weights
    def mark_teacher_keys_loaded(self, keys) -> None:
        self._teacher_loaded_keys |= set(keys) & self._teacher_keys

    def missing_teacher_keys(self) -> List[str]:
        return sorted(self._teacher_keys - self._teacher_loaded_keys)

    def check_teacher_loaded(self) -> None:
        """Raise :class:`TeacherNotLoadedError` unless every teacher tensor came from a file."""
        if self.allow_random_teacher:
            return
        missing = self.missing_teacher_keys()
        if missing:
            raise TeacherNotLoadedError(
                f"the teacher is not loaded ({len(missing)} of {len(self._teacher_keys)} tensors missing, "
                f"e.g. teacher.{missing[0]}): set TEACHER.MODEL.WEIGHTS to the teacher's detectron2 .pkl/.pth, "
                "or MODEL.WEIGHTS to a teacher+student file with the teacher under 'teacher.'. "
                "KD.ALLOW_RANDOM_TEACHER True trains against a random teacher (tests only)"
            )

    # ------------------------------------------------------------------ forward
    def preprocess_teacher_image(self, batched_inputs) -> ImageList:
        """Images in the student's format -> the teacher's (channel flip), then the teacher's normalisation.

        Padded to the larger size divisibility of the two backbones, so that FPN levels of the same
        stride have the same size.
        """
        mean, std = self.teacher.pixel_mean, self.teacher.pixel_std
        images = []
        for x in batched_inputs:
            img = x["image"].to(mean.device)
            if self._flip_for_teacher:
                img = img.flip(0)
            images.append((img - mean) / std)
        div = max(self.student.backbone.size_divisibility, self.teacher.backbone.size_divisibility)
        return ImageList.from_tensors(images, div)

    def forward(self, batched_inputs):
        if not self.training:
            return self.student(batched_inputs)
        self.check_teacher_loaded()
        # Move images once; the student's preprocessing and the teacher's then share the copy.
        batched_inputs = [dict(x, image=x["image"].to(self.device)) for x in batched_inputs]
        if self._recorder is None:
            self._recorder = StudentRecorder(self.student, self._single_taps, self._multi_taps)
        with self._recorder.recording():
            losses = self.student(batched_inputs)
        inputs = KDInputs(self, batched_inputs, self._recorder)
        for attr in self._kd_attrs:
            for k, v in getattr(self, attr)(inputs).items():
                if k in losses:
                    raise RuntimeError(f"KD method {getattr(self, attr).NAME} returned {k!r}, which is already "
                                       "a loss of this step; name losses loss_<method>[_<suffix>]")
                losses[k] = v
        self._recorder.clear()
        return losses
