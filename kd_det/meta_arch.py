"""``RCNNKD``: a detectron2 ``GeneralizedRCNN`` student distilled from a frozen teacher.

Training step (one student pass, one teacher pass, nothing run twice):

1. ``GeneralizedRCNN.forward`` computes the student's own losses. Forward hooks
   (:class:`kd_cls.hooks.FeatureCapture`) record what KD needs from that pass:
   the FPN outputs (``backbone``), the sampled proposals with ``gt_classes``
   (``roi_heads``) and the RoI class logits (``roi_heads.box_predictor``).
2. Under ``torch.inference_mode()`` the teacher runs its backbone on the same
   images (channel order flipped to the teacher's format first, then
   normalised with the teacher's mean/std) and, for logit methods, its box
   head on the student's sampled proposal boxes. Both run from an inference
   copy with the frozen BNs folded into the convolutions and NHWC weights
   (``KD.FOLD_TEACHER_BN``, ``KD.TEACHER_CHANNELS_LAST``; :mod:`kd_det.fast`);
   ``self.teacher`` itself is never changed.
3. Each KD method of ``KD.TYPE`` adds its loss (``loss_reviewkd``, ``loss_dkd``).

Parameter names match mdistiller's RCNNKD: the student at top level, the
teacher under ``teacher.``, ReviewKD's fusion modules under ``kd_trans.``.
Inference runs the student alone.
"""
from __future__ import annotations

import types
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import ImageList

from kd_cls.config import ConfigError
from kd_cls.hooks import FeatureCapture
from kd_det.config import build_teacher_cfg, kd_type_methods
from kd_cls.nn.teacher import FrozenTeacher, freeze
from kd_det.fast import fold_detectron2_norms
from kd_det.methods import KD_METHODS, KDInputs

__all__ = ["RCNNKD", "TeacherNotLoadedError", "build_teacher", "check_registered_names"]

_TAP_FEATURES = "backbone"
_TAP_PROPOSALS = "roi_heads"
_TAP_LOGITS = "roi_heads.box_predictor"


class TeacherNotLoadedError(RuntimeError):
    """KD is on but the teacher's weights were never loaded."""


def check_registered_names(cfg, who: str = "") -> None:
    """One-line errors for an unknown backbone or meta-architecture name (detectron2's do not list choices)."""
    for key, reg in (("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY), ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY)):
        name = cfg.MODEL.BACKBONE.NAME if key == "MODEL.BACKBONE.NAME" else cfg.MODEL.META_ARCHITECTURE
        if name not in reg:
            valid = ", ".join(sorted(k for k, _ in reg))
            raise ConfigError(f"unknown {who}{key} {name!r}. Valid choices: {valid}")


def build_teacher(teacher_cfg) -> nn.Module:
    """Build the teacher detector from its derived config: frozen, in eval mode, on CPU."""
    check_registered_names(teacher_cfg, "TEACHER.")
    return freeze(META_ARCH_REGISTRY.get(teacher_cfg.MODEL.META_ARCHITECTURE)(teacher_cfg))


def _has_box_head(model) -> bool:
    rh = getattr(model, "roi_heads", None)
    return all(hasattr(rh, a) for a in ("box_pooler", "box_head", "box_predictor", "box_in_features"))


@META_ARCH_REGISTRY.register()
class RCNNKD(GeneralizedRCNN):
    """Student ``GeneralizedRCNN`` + frozen ``teacher`` + KD methods (see module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        teacher: nn.Module,
        kd_methods: Sequence[nn.Module],
        teacher_pixel_mean: Sequence[float],
        teacher_pixel_std: Sequence[float],
        teacher_input_format: str,
        teacher_weights: str = "",
        allow_random_teacher: bool = False,
        fold_teacher_bn: bool = True,
        teacher_channels_last: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.teacher = teacher
        # Not a submodule: the inference copies stay out of state_dict(), parameters() and .to().
        self.__dict__["frozen_teacher"] = FrozenTeacher(
            teacher, fold_bn=fold_teacher_bn, channels_last=teacher_channels_last, folder=fold_detectron2_norms
        )
        self._kd_attrs: List[str] = []
        for m in kd_methods:
            setattr(self, m.ATTR, m)
            self._kd_attrs.append(m.ATTR)
        self._needs_logits = any(getattr(m, "NEEDS_ROI_LOGITS", False) for m in kd_methods)
        formats = {self.input_format, teacher_input_format}
        if len(formats) > 1 and not formats <= {"RGB", "BGR"}:
            raise ConfigError(
                f"teacher INPUT.FORMAT {teacher_input_format!r} vs student {self.input_format!r}: "
                "only RGB <-> BGR can be converted"
            )
        self._flip_for_teacher = len(formats) > 1
        self.teacher_input_format = teacher_input_format
        self.register_buffer("teacher_pixel_mean", torch.tensor(teacher_pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("teacher_pixel_std", torch.tensor(teacher_pixel_std).view(-1, 1, 1), False)
        self.allow_random_teacher = allow_random_teacher
        self._teacher_keys = frozenset(self.teacher.state_dict().keys())
        self._teacher_loaded_keys: set = set()
        self.register_load_state_dict_post_hook(RCNNKD._record_teacher_keys)
        self._capture: Optional[FeatureCapture] = None
        if teacher_weights:
            from kd_det.checkpoint import load_teacher_weights

            load_teacher_weights(self, teacher_weights)

    @classmethod
    def from_config(cls, cfg):
        check_registered_names(cfg)
        methods = kd_type_methods(cfg.KD.TYPE)
        tcfg = build_teacher_cfg(cfg)
        ret = super().from_config(cfg)
        teacher = build_teacher(tcfg)
        student_view = types.SimpleNamespace(backbone=ret["backbone"], roi_heads=ret["roi_heads"])
        kd_methods = []
        for name in methods:
            method_cls = KD_METHODS.get(name)
            if getattr(method_cls, "NEEDS_ROI_LOGITS", False):
                for who, model in (("student", student_view), ("teacher", teacher)):
                    if not _has_box_head(model):
                        raise ConfigError(f"KD.TYPE {cfg.KD.TYPE} needs RoI box heads; the {who} has none")
            kd_methods.append(method_cls.from_models(cfg, student_view, teacher))
        ret.update(
            teacher=teacher,
            kd_methods=kd_methods,
            teacher_pixel_mean=tcfg.MODEL.PIXEL_MEAN,
            teacher_pixel_std=tcfg.MODEL.PIXEL_STD,
            teacher_input_format=tcfg.INPUT.FORMAT,
            teacher_weights=tcfg.MODEL.WEIGHTS,
            allow_random_teacher=cfg.KD.ALLOW_RANDOM_TEACHER,
            fold_teacher_bn=cfg.KD.FOLD_TEACHER_BN,
            teacher_channels_last=cfg.KD.TEACHER_CHANNELS_LAST,
        )
        return ret

    # ------------------------------------------------------------------ state
    @staticmethod
    def _record_teacher_keys(module: "RCNNKD", incompatible) -> None:
        missing = {k.split("teacher.", 1)[1] for k in incompatible.missing_keys if "teacher." in k}
        module._teacher_loaded_keys |= set(module._teacher_keys) - missing

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

    def kd_module_names(self) -> List[str]:
        """Top-level attributes that exist only for distillation (dropped from the student export)."""
        return ["teacher"] + list(self._kd_attrs)

    def student_state_dict(self) -> Dict[str, torch.Tensor]:
        """State dict that loads into a plain ``GeneralizedRCNN`` built from the student's config."""
        drop = tuple(n + "." for n in self.kd_module_names())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(drop)}

    # ---------------------------------------------------------------- forward
    def _feature_capture(self) -> FeatureCapture:
        if self._capture is None:
            taps = [_TAP_FEATURES, _TAP_PROPOSALS] + ([_TAP_LOGITS] if self._needs_logits else [])
            self._capture = FeatureCapture(self, taps)
        return self._capture

    def preprocess_teacher_image(self, batched_inputs) -> ImageList:
        """Images in the student's format -> teacher format (channel flip), then the teacher's normalisation.

        Padded to the same size as the student's batch so that FPN levels align.
        """
        images = []
        for x in batched_inputs:
            img = x["image"].to(self.device)
            if self._flip_for_teacher:
                img = img.flip(0)
            images.append((img - self.teacher_pixel_mean) / self.teacher_pixel_std)
        div = max(self.backbone.size_divisibility, self.teacher.backbone.size_divisibility)
        return ImageList.from_tensors(images, div)

    def _teacher_roi_logits(self, features, proposals) -> torch.Tensor:
        rh = self.frozen_teacher.inference_module("roi_heads")
        x = rh.box_pooler([features[f] for f in rh.box_in_features], [p.proposal_boxes for p in proposals])
        scores = rh.box_predictor(rh.box_head(x))
        return scores[0] if isinstance(scores, (tuple, list)) else scores

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        self.check_teacher_loaded()
        # Move images once; the student's preprocess_image and the teacher then share the copy.
        batched_inputs = [dict(x, image=x["image"].to(self.device)) for x in batched_inputs]
        cap = self._feature_capture()
        with cap:
            losses = super().forward(batched_inputs)
        feats = cap.features
        cap.clear()
        sampled = feats[_TAP_PROPOSALS]
        with torch.inference_mode():
            t_feats = self.frozen_teacher.inference_module("backbone")(self.preprocess_teacher_image(batched_inputs).tensor)
            t_logits = self._teacher_roi_logits(t_feats, sampled) if self._needs_logits else None
        # Inference tensors cannot be saved for backward; clone them into normal tensors.
        t_feats = {k: v.clone() for k, v in t_feats.items()}
        inputs = KDInputs(student_features=feats[_TAP_FEATURES], teacher_features=t_feats)
        if self._needs_logits:
            inputs.student_logits = feats[_TAP_LOGITS]
            inputs.teacher_logits = t_logits.clone()
            inputs.gt_classes = torch.cat([p.gt_classes for p in sampled])
        for attr in self._kd_attrs:
            losses.update(getattr(self, attr)(inputs))
        return losses
