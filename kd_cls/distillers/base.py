"""The ``Distiller`` base class, its registry and ``build_distiller``.

A distiller wraps a student and a frozen teacher. Called as mdistiller calls it:

* training: ``distiller(image=x, target=y, epoch=e, **batch_extras)`` returns
  ``(student_logits, {"loss_ce": ..., "loss_kd": ..., ...})``; the trainer sums
  the dict;
* evaluation (``.eval()``): ``distiller(image=x)`` returns the student's logits.

A method is one file: subclass ``Distiller``, decorate it with
``@register_distiller("NAME")`` and declare its hyperparameters in a
``add_config(cfg)`` staticmethod; they then appear in ``get_cfg()``.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kd_cls.config import register_config
from kd_cls.hooks import FeatureCapture
from kd_cls.registry import Registry

DISTILLERS = Registry("distiller", case_sensitive=False)


def register_distiller(name: str):
    """Register a ``Distiller`` subclass under ``cfg.DISTILLER.TYPE == name``.

    If the class defines ``add_config(cfg)``, it is registered as a config hook.
    """

    def deco(cls):
        DISTILLERS.register(name, cls)
        cls.method_name = name
        add = cls.__dict__.get("add_config")
        if add is not None:
            register_config(add.__func__ if isinstance(add, staticmethod) else add)
        return cls

    return deco


def count_params(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


class Distiller(nn.Module):
    """Student + frozen teacher. Subclasses implement ``forward_train``.

    The teacher stays in eval mode with ``requires_grad=False`` and runs under
    ``torch.inference_mode()``. When ``fold_teacher_bn`` is set, it runs
    through a separate inference copy whose BatchNorms are folded into the
    convolutions; the registered ``self.teacher`` (what checkpoints hold and
    what OFD reads BN statistics from) is never modified. The copy is rebuilt
    whenever a teacher tensor was loaded, edited in place or moved since.
    """

    method_name = "NONE"

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], cfg=None, num_data: Optional[int] = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.fold_teacher_bn = bool(cfg.SOLVER.FOLD_TEACHER_BN) if cfg is not None else False
        # The inference copy's weights in channels_last (NHWC convolutions), also on the CPU.
        self.teacher_channels_last = bool(cfg.SOLVER.CHANNELS_LAST) if cfg is not None else False
        self._teacher_infer: Optional[nn.Module] = None  # built lazily, not a submodule
        self._teacher_key: tuple = ()  # state_fingerprint(teacher) when the copy was built
        self._captures: Dict[Tuple[int, tuple], FeatureCapture] = {}
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()

    # ----- modes and parameters (mdistiller's API) -----
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

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

    # ----- the teacher's inference copy -----
    def _drop_teacher_copy(self) -> None:
        old = self._teacher_infer
        if old is not None:
            self._captures = {k: v for k, v in self._captures.items() if k[0] != id(old)}
        self.__dict__["_teacher_infer"] = None

    def teacher_for_inference(self, example_input=None, taps: Sequence[str] = ()) -> nn.Module:
        """The module that runs the teacher: ``self.teacher``, or its BN-folded inference copy.

        ``example_input`` (the first batch) lets the copy be checked against the
        teacher once; ``taps`` that folding would change keep their pairs unfolded.
        """
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} needs a teacher, but none was given")
        if not self.fold_teacher_bn:
            return self.teacher
        from kd_cls.engine.fast import fold_batchnorm, fold_conflicts, state_fingerprint

        keep = tuple(taps)
        old = self._teacher_infer
        key = state_fingerprint(self.teacher)
        # Rebuild when the teacher was loaded, edited or moved since the copy was made, or when
        # a new tap reads a value the copy folded away; taps kept before stay kept.
        if old is not None and (
            key != self._teacher_key or (taps and fold_conflicts(getattr(old, "folded_pairs", {}), taps))
        ):
            keep = tuple(dict.fromkeys(tuple(getattr(old, "kept_taps", ())) + keep))
            self._drop_teacher_copy()
        if self._teacher_infer is None:
            # Bypass nn.Module.__setattr__: the copy must stay out of state_dict() and parameters().
            self.__dict__["_teacher_infer"] = fold_batchnorm(
                self.teacher, keep_taps=keep, example_input=example_input, channels_last=self.teacher_channels_last
            )
            self._teacher_key = key
        return self._teacher_infer

    # ----- running the models with feature capture -----
    def _capture(self, model: nn.Module, taps: Sequence[str], detach: bool) -> FeatureCapture:
        key = (id(model), tuple(taps))
        cap = self._captures.get(key)
        if cap is None:
            cap = FeatureCapture(model, taps, detach=detach).attach()
            self._captures[key] = cap
        return cap

    def run_student(self, image: torch.Tensor, taps: Sequence[str] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(logits, [features at taps])`` of the student, with gradients."""
        if not taps:
            return self.student(image), []
        cap = self._capture(self.student, taps, detach=False)
        cap.clear()
        logits = self.student(image)
        feats = cap.get(taps)
        cap.clear()
        return logits, feats

    @torch.no_grad()
    def run_teacher(self, image: torch.Tensor, taps: Sequence[str] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(logits, [features at taps])`` of the frozen teacher, without gradients.

        Runs under ``inference_mode``; the outputs are then cloned outside it,
        since inference tensors cannot be saved for the student's backward pass.
        """
        model = self.teacher_for_inference(image, taps)
        cap = self._capture(model, taps, detach=True) if taps else None
        with torch.inference_mode():
            if cap is not None:
                cap.clear()
            logits = model(image)
            feats = cap.get(taps) if cap is not None else []
        if cap is not None:
            cap.clear()
        return logits.clone(), [f.clone() for f in feats]

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
    import kd_cls.distillers  # noqa: F401  (registers the built-in methods)

    cls = DISTILLERS.get(cfg.DISTILLER.TYPE)
    if num_data is None:
        from kd_cls.data.registry import get_dataset_info

        num_data = get_dataset_info(cfg.DATASET.TYPE).num_train
    if cls.method_name.upper() != "NONE" and teacher is None:
        raise ValueError(f"DISTILLER.TYPE {cfg.DISTILLER.TYPE!r} needs a teacher model")
    return cls(student, teacher, cfg, num_data=num_data)
