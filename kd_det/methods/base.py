"""The detection KD method contract and its registry (``KD_METHODS``).

A method is one file (here, or in a user's module named in ``KD.IMPORTS``)::

    @register_kd_method("MyKD")               # the name in KD.METHODS, case-sensitive
    class MyKD(KDMethod):
        NEEDS = (FPN,)                        # what it reads each step (constants below)
        STUDENT_FAMILIES = None               # None: any detector with an FPN; else e.g. ("retinanet", "fcos")

        @staticmethod
        def add_config(cfg):                  # its keys, under KD.<NAME in upper case>
            cfg.KD.MYKD = CN()
            cfg.KD.MYKD.LOSS_WEIGHT = 1.0

        @classmethod
        def from_config(cls, cfg, pair):      # pair: a kd_det.pairing.DetectorPair
            return cls(...)

        def forward(self, inputs):            # inputs: a kd_det.inputs.KDInputs
            return {"loss_mykd": ...}         # loss_<name in lower case>[_<suffix>]

The distiller computes each declared need once per step, and only when some
method declares it; a method may also list dotted student module paths in
``student_taps()`` (outputs of every call, in order, e.g. once per FPN level of
a head). ``ATTR`` is the attribute the distiller holds the method under, which
fixes its parameter names in checkpoints (mdistiller's ReviewKD is ``kd_trans``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from kd_cls.registry import Registry

__all__ = [
    "KD_METHODS", "KDMethod", "register_kd_method", "config_node_name", "loss_name",
    "FPN", "BOTTOM_UP", "ROI_LOGITS", "DENSE_HEAD", "TEACHER_HEAD", "ALL_NEEDS",
]

# What a method may read (see kd_det.inputs.KDInputs for the fields each gives).
FPN = "fpn"                # student and teacher FPN outputs, paired by stride
BOTTOM_UP = "bottom_up"    # student and teacher backbone.bottom_up outputs
ROI_LOGITS = "roi_logits"  # R-CNN: RoI class logits of both on the student's sampled proposals
DENSE_HEAD = "dense_head"  # RetinaNet/FCOS: head outputs of both, the student's anchors and their labels
TEACHER_HEAD = "teacher_head"  # the teacher's head modules, to run on student features with autograd on
ALL_NEEDS = (FPN, BOTTOM_UP, ROI_LOGITS, DENSE_HEAD, TEACHER_HEAD)

KD_METHODS = Registry("KD method")


def config_node_name(method_name: str) -> str:
    """``KD.<this>`` holds a method's keys: its name in upper case (``ReviewKD`` -> ``REVIEWKD``)."""
    return method_name.upper()


def loss_name(method_name: str, suffix: str = "") -> str:
    """``loss_<name in lower case>[_<suffix>]``, the key a method's loss has in the loss dict and metrics."""
    return f"loss_{method_name.lower()}" + (f"_{suffix}" if suffix else "")


def register_kd_method(name: str):
    """Register a :class:`KDMethod` subclass as ``name`` (the spelling ``KD.METHODS`` uses)."""

    def deco(cls):
        KD_METHODS.register(name, cls)
        cls.NAME = name
        if not cls.__dict__.get("ATTR"):
            cls.ATTR = f"kd_{name.lower()}"
        bad = [n for n in cls.NEEDS if n not in ALL_NEEDS]
        if bad:
            raise ValueError(f"KD method {name}: unknown need {bad[0]!r}; valid: {', '.join(ALL_NEEDS)}")
        return cls

    return deco


class KDMethod(nn.Module):
    """Base class of detection KD methods (see the module docstring for the contract)."""

    NAME = ""
    ATTR = ""
    NEEDS: Tuple[str, ...] = ()
    # Student / teacher families the method serves (None: any family the needs allow).
    STUDENT_FAMILIES: Optional[Tuple[str, ...]] = None
    TEACHER_FAMILIES: Optional[Tuple[str, ...]] = None

    @staticmethod
    def add_config(cfg) -> None:
        """Add ``KD.<NAME>`` with at least ``LOSS_WEIGHT``."""

    @classmethod
    def from_config(cls, cfg, pair) -> "KDMethod":
        raise NotImplementedError

    def student_taps(self) -> Sequence[str]:
        """Dotted paths of student modules whose outputs the method reads (``inputs.taps[path]``)."""
        return ()

    def forward(self, inputs) -> Dict[str, torch.Tensor]:
        raise NotImplementedError
