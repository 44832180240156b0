"""Detector families, and how a student and a teacher pair up (FPN levels by stride, needs, inheritance).

Families: ``rcnn`` (``GeneralizedRCNN``: Faster/Mask R-CNN), ``retinanet`` and
``fcos`` (detectron2's dense detectors), and ``other`` (any detector with a
``backbone``; feature methods only).

FPN levels pair by stride: R-CNN has p2-p6 (strides 4-64), RetinaNet and FCOS
p3-p7 (8-128), so an R-CNN teacher and a RetinaNet student share p3-p6. Levels
present in only one of the two are named once in the log. mmrazor pairs levels
by index and resizes the student's map instead; pairing by stride compares maps
that see the same image area, so no resize is needed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from torch import nn

from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from kd_cls.config import ConfigError

from .methods.base import BOTTOM_UP, DENSE_HEAD, FPN, ROI_LOGITS, TEACHER_HEAD

__all__ = ["FAMILIES", "family_of", "family_of_arch", "num_classes_key", "DetectorPair", "check_needs",
           "inherit_keys", "INHERIT_PARTS"]

logger = logging.getLogger("kd_det")

FAMILIES = ("rcnn", "retinanet", "fcos", "other")
# MODEL.META_ARCHITECTURE -> family, for configs (before anything is built).
_ARCH_FAMILY = {"GeneralizedRCNN": "rcnn", "RCNNKD": "rcnn", "RetinaNet": "retinanet", "FCOS": "fcos"}
# Where each family keeps its class count.
_NUM_CLASSES_KEY = {"rcnn": "MODEL.ROI_HEADS.NUM_CLASSES", "retinanet": "MODEL.RETINANET.NUM_CLASSES",
                    "fcos": "MODEL.FCOS.NUM_CLASSES"}
INHERIT_PARTS = ("neck", "head")


def family_of(model: nn.Module) -> str:
    if isinstance(model, GeneralizedRCNN):
        return "rcnn"
    if isinstance(model, _D2FCOS):
        return "fcos"
    if isinstance(model, RetinaNet):
        return "retinanet"
    return "other"


def family_of_arch(arch: str) -> str:
    return _ARCH_FAMILY.get(arch, "other")


def num_classes_key(family: str) -> str:
    """The config key holding a family's class count (R-CNN's for ``other``)."""
    return _NUM_CLASSES_KEY.get(family, _NUM_CLASSES_KEY["rcnn"])


def _fpn_levels(model: nn.Module, who: str) -> Dict[int, Tuple[str, int]]:
    """``{stride: (level name, channels)}`` of a detector's backbone outputs."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "output_shape"):
        raise ConfigError(f"the {who} {type(model).__name__} has no detectron2 backbone to read features from")
    return {s.stride: (name, s.channels) for name, s in backbone.output_shape().items()}


@dataclass
class DetectorPair:
    """A student and a teacher detector, with what methods need to know to be built."""

    student: nn.Module
    teacher: nn.Module
    student_family: str = ""
    teacher_family: str = ""
    # [(stride, student level, teacher level, student channels, teacher channels)], finest first.
    fpn_pairs: List[Tuple[int, str, str, int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module) -> "DetectorPair":
        pair = cls(student, teacher, family_of(student), family_of(teacher))
        s, t = _fpn_levels(student, "student"), _fpn_levels(teacher, "teacher")
        pair.fpn_pairs = [(k, s[k][0], t[k][0], s[k][1], t[k][1]) for k in sorted(set(s) & set(t))]
        unpaired = [f"student {s[k][0]} (stride {k})" for k in sorted(set(s) - set(t))] + \
                   [f"teacher {t[k][0]} (stride {k})" for k in sorted(set(t) - set(s))]
        if unpaired and pair.fpn_pairs:
            logger.info("FPN levels without a partner, not distilled: " + ", ".join(unpaired))
        return pair

    def describe_levels(self) -> str:
        s, t = _fpn_levels(self.student, "student"), _fpn_levels(self.teacher, "teacher")
        fmt = lambda d: ", ".join(f"{n} (stride {k})" for k, (n, _) in sorted(d.items()))  # noqa: E731
        return f"student {self.student_family} has {fmt(s)}; teacher {self.teacher_family} has {fmt(t)}"

    def require_fpn_pairs(self, method: str) -> List[Tuple[int, str, str, int, int]]:
        if not self.fpn_pairs:
            raise ConfigError(f"{method}: no FPN level with the same stride in student and teacher: "
                              f"{self.describe_levels()}")
        return self.fpn_pairs


def check_needs(method_cls, pair: DetectorPair) -> None:
    """One-line config error when the pair's families cannot serve what the method needs."""
    name = method_cls.NAME
    sf, tf = pair.student_family, pair.teacher_family
    for role, fam, allowed in (("student", sf, method_cls.STUDENT_FAMILIES),
                               ("teacher", tf, method_cls.TEACHER_FAMILIES)):
        if allowed is not None and fam not in allowed:
            raise ConfigError(f"KD method {name} does not serve a {fam} {role} "
                              f"(student {sf}, teacher {tf}); it serves {role}s of: {', '.join(allowed)}")
    needs = set(method_cls.NEEDS)
    if ROI_LOGITS in needs and (sf, tf) != ("rcnn", "rcnn"):
        raise ConfigError(f"KD method {name} needs R-CNN RoI logits from both models, but the student is "
                          f"{sf} and the teacher {tf}; use it with GeneralizedRCNN student and teacher")
    if DENSE_HEAD in needs and not {sf, tf} <= {"retinanet", "fcos"}:
        raise ConfigError(f"KD method {name} needs dense-head outputs (RetinaNet/FCOS) from both models, but the "
                          f"student is {sf} and the teacher {tf}")
    if TEACHER_HEAD in needs and sf != tf:
        raise ConfigError(f"KD method {name} runs the teacher's head on student features, which needs one "
                          f"family; the student is {sf} and the teacher {tf}")
    if BOTTOM_UP in needs:
        for role, m in (("student", pair.student), ("teacher", pair.teacher)):
            if not hasattr(getattr(m, "backbone", None), "bottom_up"):
                raise ConfigError(f"KD method {name} reads backbone.bottom_up, which the {role} "
                                  f"{type(getattr(m, 'backbone', None)).__name__} does not have")
    if FPN in needs:
        pair.require_fpn_pairs(name)


def _part_prefixes(model: nn.Module, part: str) -> Tuple[Sequence[str], Sequence[str]]:
    """``(included prefixes, excluded prefixes)`` of an inheritable part's state-dict keys."""
    if part == "neck":
        return ("backbone.",), ("backbone.bottom_up.",)
    if family_of(model) == "rcnn":
        return ("proposal_generator.", "roi_heads."), ()
    return ("head.",), ()


def inherit_keys(pair: DetectorPair, parts: Sequence[str], copy: bool = True) -> List[str]:
    """Copy the named parts' weights from the teacher into the student (``KD.INHERIT``); returns the keys.

    Same family only; every key of the part must exist in the teacher with the same shape.
    ``copy=False`` checks only.
    """
    bad = [p for p in parts if p not in INHERIT_PARTS]
    if bad:
        raise ConfigError(f"unknown KD.INHERIT part {bad[0]!r}. Valid choices: {', '.join(INHERIT_PARTS)}")
    if parts and pair.student_family != pair.teacher_family:
        raise ConfigError(f"KD.INHERIT {list(parts)} needs one family; the student is {pair.student_family} "
                          f"and the teacher {pair.teacher_family}")
    s_state, t_state = pair.student.state_dict(), pair.teacher.state_dict()
    copied: List[str] = []
    for part in parts:
        inc, exc = _part_prefixes(pair.student, part)
        keys = [k for k in s_state if k.startswith(tuple(inc)) and not k.startswith(tuple(exc) or ("\0",))]
        mismatched = [k for k in keys if k not in t_state or t_state[k].shape != s_state[k].shape]
        if mismatched:
            shown = ", ".join(
                f"{k} {tuple(s_state[k].shape)} vs {tuple(t_state[k].shape) if k in t_state else 'absent'}"
                for k in mismatched[:3])
            more = f" ({len(mismatched)} in all)" if len(mismatched) > 3 else ""
            raise ConfigError(f"KD.INHERIT {part}: student keys that do not match the teacher's: {shown}{more}")
        for k in keys if copy else ():
            s_state[k].copy_(t_state[k])
        copied += keys
    return copied
