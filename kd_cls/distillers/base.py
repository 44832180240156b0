"""The ``Distiller`` base class, its registry and ``build_distiller``.

A distiller wraps a student and a frozen teacher. Called as mdistiller calls it:

* training: ``distiller(image=x, target=y, epoch=e, **batch_extras)`` returns
  ``(student_logits, {"loss_ce": ..., "loss_kd": ..., ...})``; the trainer sums
  the dict;
* evaluation (``.eval()``): ``distiller(image=x)`` returns the student's logits.

A method is one file: subclass ``Distiller``, decorate it with
``@register_distiller("NAME")`` and declare its hyperparameters in a
``add_config(cfg)`` staticmethod; they then appear in ``kd_cls.engine.get_cfg()``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kd_cls.data.registry import get_dataset_info
from kd_cls.hooks import FeatureCapture
from kd_cls.nn.teacher import FrozenTeacher
from kd_cls.registry import Registry

DISTILLERS = Registry("distiller", case_sensitive=False)


def register_distiller(name: str):
    """Register a ``Distiller`` subclass under ``cfg.DISTILLER.TYPE == name``.

    A class may declare its config node in an ``add_config(cfg)`` staticmethod;
    :func:`add_distiller_configs` adds them all to a config.
    """

    def deco(cls):
        DISTILLERS.register(name, cls)
        cls.method_name = name
        return cls

    return deco


def add_distiller_configs(cfg) -> None:
    """Add the config node of every registered method that declares one (its own ``add_config``)."""
    seen = set()
    for name in DISTILLERS:
        cls = DISTILLERS.get(name)
        add = cls.__dict__.get("add_config")
        if add is not None and cls not in seen:
            seen.add(cls)
            (add.__func__ if isinstance(add, staticmethod) else add)(cfg)


def count_params(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


class Distiller(nn.Module):
    """Student + frozen teacher. Subclasses implement ``forward_train``.

    The teacher is a :class:`kd_cls.nn.teacher.FrozenTeacher`: eval mode,
    ``requires_grad=False``, run under ``torch.inference_mode()``, from a
    BN-folded NHWC inference copy when ``SOLVER.FOLD_TEACHER_BN`` /
    ``SOLVER.CHANNELS_LAST`` are on. ``self.teacher`` (what checkpoints hold and
    what OFD reads BN statistics from) is never modified.
    """

    method_name = "NONE"
    #: The method reads the teacher's logits and nothing else (no features): a teacher-logit cache
    #: (``SOLVER.TEACHER_CACHE``) can then stand in for the teacher's forward pass.
    teacher_logits_only = False

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], cfg=None, num_data: Optional[int] = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        fold = bool(cfg.SOLVER.FOLD_TEACHER_BN) if cfg is not None else False
        # The folded copy's weights in channels_last (NHWC convolutions), also on the CPU. Without
        # folding there is no copy: the trainer's SOLVER.CHANNELS_LAST already converts the teacher.
        channels_last = fold and bool(cfg.SOLVER.CHANNELS_LAST)
        # Not a submodule: the frozen teacher's copies stay out of state_dict() and parameters().
        self.__dict__["frozen_teacher"] = (
            FrozenTeacher(teacher, fold_bn=fold, channels_last=channels_last) if teacher is not None else None
        )
        self._captures: Dict[tuple, FeatureCapture] = {}
        # A kd_cls.nn.teacher_cache.TeacherLogitCache, attached by the engine when the run can use one.
        self.teacher_cache = None

    # ----- parameters (mdistiller's API) -----
    def extra_modules(self) -> List[nn.Module]:
        """The method's learnable modules besides the student (connectors, ...)."""
        return []

    def get_learnable_parameters(self) -> List[torch.Tensor]:
        params = list(self.student.parameters())
        for m in self.extra_modules():
            params += list(m.parameters())
        return params

    def get_extra_parameters(self) -> int:
        """Number of parameters the method adds (as mdistiller counts them)."""
        return sum(count_params(m.parameters()) for m in self.extra_modules())

    def extra_parameter_notes(self) -> List[str]:
        """Lines for the trainer to print about learnable parameters that
        ``get_extra_parameters()`` leaves out (to match mdistiller's count)."""
        return []

    def check_shapes(self, image_size: int) -> None:
        """Raise a one-line error for feature shapes that do not fit the method's config.

        Called once before the run directory exists, with the dataset's input
        side; methods whose shapes come from the config (ReviewKD, CRD) probe
        both models on one random image (:func:`._feature_common.probe_shapes`).
        """

    # ----- running the models with feature capture -----
    def teacher_for_inference(self, example_input=None, taps: Sequence[str] = ()) -> nn.Module:
        """The module that runs the teacher: ``self.teacher``, or its BN-folded inference copy."""
        if self.frozen_teacher is None:
            raise RuntimeError(f"{type(self).__name__} needs a teacher, but none was given")
        return self.frozen_teacher.inference_module("", example_input, taps)

    def run_student(self, image: torch.Tensor, taps: Sequence[str] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(logits, [features at taps])`` of the student, with gradients."""
        if not taps:
            return self.student(image), []
        key = tuple(taps)
        cap = self._captures.get(key)
        if cap is None:
            cap = self._captures[key] = FeatureCapture(self.student, taps).attach()
        cap.clear()
        logits = self.student(image)
        feats = cap.get(taps)
        cap.clear()
        return logits, feats

    def run_teacher(self, image: torch.Tensor, taps: Sequence[str] = (), index: Optional[torch.Tensor] = None,
                    view: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(logits, [features at taps])`` of the frozen teacher, without gradients.

        With a teacher cache attached and the batch's sample ``index`` and
        augmentation ``view`` given, logits come from the cache and the teacher
        runs on the misses only (see :meth:`cached_teacher_logits`).
        """
        if self.frozen_teacher is None:
            raise RuntimeError(f"{type(self).__name__} needs a teacher, but none was given")
        if self.teacher_cache is not None and not taps and index is not None and view is not None:
            return self.cached_teacher_logits(image, index, view), []
        return self.frozen_teacher.run(image, taps=taps)

    def cached_teacher_logits(self, image: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of ``image`` from the cache; misses are computed in one batch and stored."""
        cache = self.teacher_cache
        hits, cached = cache.lookup(index, view)
        dev = image.device
        if bool(hits.all()):
            # What the teacher would return under autocast (the cache holds its values in float32).
            amp = torch.is_autocast_enabled(dev.type)
            return cached.to(dev, torch.get_autocast_dtype(dev.type) if amp else torch.float32)
        if not bool(hits.any()):
            logits, _ = self.frozen_teacher.run(image)
            cache.store(index, view, logits)
            return logits
        miss = (~hits).nonzero().squeeze(1)
        miss_dev = miss.to(dev)
        logits, _ = self.frozen_teacher.run(image.index_select(0, miss_dev))
        cache.store(index.index_select(0, miss_dev), view.index_select(0, miss_dev), logits)
        out = cached.to(dev, logits.dtype)
        out[miss_dev] = logits
        return out

    # ----- forward -----
    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        raise NotImplementedError

    def forward_test(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image)

    def forward(self, image: torch.Tensor, target: Optional[torch.Tensor] = None, **kwargs):
        if self.training:
            if target is None:
                raise ValueError("training forward needs target=")
            return self.forward_train(image=image, target=target, **kwargs)
        return self.forward_test(image)


def warmup_factor(epoch: Optional[float], warmup_epochs: float) -> float:
    """Linear warm-up ``min(epoch / warmup, 1)``; 1 when no epoch is known or warmup is 0."""
    if epoch is None or not warmup_epochs:
        return 1.0
    return min(float(epoch) / float(warmup_epochs), 1.0)


def build_distiller(cfg, student: nn.Module, teacher: Optional[nn.Module], num_data: Optional[int] = None) -> Distiller:
    """The distiller that ``cfg.DISTILLER.TYPE`` names.

    ``num_data`` (CRD's memory size) defaults to the training-set size of
    ``cfg.DATASET.TYPE``.
    """
    cls = DISTILLERS.get(cfg.DISTILLER.TYPE)
    if num_data is None:
        num_data = get_dataset_info(cfg.DATASET.TYPE).num_train
    if cls.method_name.upper() != "NONE" and teacher is None:
        raise ValueError(f"DISTILLER.TYPE {cfg.DISTILLER.TYPE!r} needs a teacher model")
    return cls(student, teacher, cfg, num_data=num_data)
