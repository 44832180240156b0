"""The frozen teacher: one mechanism for both frontends.

A teacher never trains: its parameters have ``requires_grad=False`` and it
stays in eval mode whatever ``train()`` its owner is put in. It runs under
``torch.inference_mode()``, and for speed from an *inference copy* whose
BatchNorms are folded into the convolutions before them and whose weights are
NHWC (``channels_last``); the results are equal within float rounding.

:class:`FrozenTeacher` is not an ``nn.Module``: its owner (a classification
``Distiller``, the detection wrapper) keeps the teacher registered under its
own name, so checkpoints keep their ``teacher.`` keys, and the copy stays out
of ``state_dict()``, ``parameters()`` and ``.to()``. The registered teacher is
the single source of truth: a copy is rebuilt whenever any teacher tensor was
loaded, edited in place, replaced or moved since it was made
(:func:`kd_cls.nn.bn_fold.state_fingerprint`).

How a copy is folded is pluggable (``folder``): plain PyTorch models use
:func:`kd_cls.nn.bn_fold.fold_batchnorm` (a graph search for conv -> BN
pairs); detectron2 models, whose ``Conv2d`` applies its norm inside its own
``forward``, pass their own folder.
"""
from __future__ import annotations

import copy
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kd_cls.hooks import FeatureCapture

from .bn_fold import fold_batchnorm, fold_conflicts, state_fingerprint

__all__ = ["FrozenTeacher", "freeze", "Folder"]

#: ``folder(module, keep_taps, example_input, channels_last) -> inference copy`` of ``module``.
Folder = Callable[[nn.Module, Sequence[str], object, bool], nn.Module]


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter, eval mode, and a ``train()`` that keeps eval mode.

    The ``train`` override is a bound method of ``module`` itself, so a deep
    copy of the module (an inference copy) binds it to the copy.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    module.train = types.MethodType(_stay_in_eval, module)
    return module.eval()


def _plain_copy(module: nn.Module, keep_taps: Sequence[str], example_input, channels_last: bool) -> nn.Module:
    out = copy.deepcopy(module).eval()
    return out.to(memory_format=torch.channels_last) if channels_last else out


def _clone(tree):
    """Inference tensors cannot be saved for the student's backward pass: clone them into normal ones."""
    if torch.is_tensor(tree):
        return tree.clone()
    if isinstance(tree, dict):
        return type(tree)((k, _clone(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


class FrozenTeacher:
    """A frozen ``module`` and its lazily built inference copies (see the module docstring).

    Args:
        module: the teacher; it is frozen here (:func:`freeze`) and never modified otherwise.
        fold_bn: fold BatchNorms into the inference copy.
        channels_last: store the copy's 4-d weights in NHWC.
        folder: how to fold a module (default :func:`kd_cls.nn.bn_fold.fold_batchnorm`).
    """

    def __init__(self, module: nn.Module, fold_bn: bool = True, channels_last: bool = False,
                 folder: Optional[Folder] = None):
        self.module = freeze(module)
        self.fold_bn = bool(fold_bn)
        self.channels_last = bool(channels_last)
        self.folder: Folder = folder or fold_batchnorm
        self._copies: Dict[str, nn.Module] = {}
        self._key: tuple = ()
        self._captures: Dict[Tuple[str, tuple], FeatureCapture] = {}

    @property
    def uses_copy(self) -> bool:
        return self.fold_bn or self.channels_last

    def _part(self, part: str) -> nn.Module:
        return self.module.get_submodule(part) if part else self.module

    def drop_copies(self) -> None:
        self._copies = {}
        self._captures = {}

    def inference_module(self, part: str = "", example_input=None, taps: Sequence[str] = ()) -> nn.Module:
        """The module that runs ``teacher.<part>`` (``""``: the whole teacher) for inference.

        That is the teacher's own part when neither folding nor ``channels_last``
        is on, else its inference copy. ``example_input`` (a first batch) lets a
        folder check the copy against the original once; ``taps`` whose value
        folding would change keep their layers unfolded (taps kept before stay kept).
        """
        if not self.uses_copy:
            return self._part(part)
        key = state_fingerprint(self.module)
        if key != self._key:
            self.drop_copies()
            self._key = key
        old = self._copies.get(part)
        if old is not None and taps and fold_conflicts(getattr(old, "folded_pairs", {}), taps):
            taps = tuple(dict.fromkeys(tuple(getattr(old, "kept_taps", ())) + tuple(taps)))
            self._captures = {k: v for k, v in self._captures.items() if k[0] != part}
            old = None
        if old is None:
            folder = self.folder if self.fold_bn else _plain_copy
            old = folder(self._part(part), tuple(taps), example_input, self.channels_last)
            self._copies[part] = old
        return old

    def _capture(self, part: str, model: nn.Module, taps: Sequence[str]) -> FeatureCapture:
        key = (part, tuple(taps))
        cap = self._captures.get(key)
        if cap is None or cap.model is not model:
            if cap is not None:
                cap.detach_hooks()
            cap = FeatureCapture(model, taps, detach=True).attach()
            self._captures[key] = cap
        return cap

    @torch.no_grad()
    def run(self, *inputs, taps: Sequence[str] = (), part: str = "", **kwargs) -> Tuple[object, List[torch.Tensor]]:
        """``(output, [features at taps])`` of ``teacher.<part>(*inputs, **kwargs)``, without gradients.

        Runs under ``inference_mode``; tensors are cloned outside it so that the
        student's losses can use them.
        """
        example = inputs if len(inputs) != 1 else inputs[0]
        model = self.inference_module(part, example, taps)
        cap = self._capture(part, model, taps) if taps else None
        with torch.inference_mode():
            if cap is not None:
                cap.clear()
            out = model(*inputs, **kwargs)
            feats = cap.get(taps) if cap is not None else []
        if cap is not None:
            cap.clear()
        return _clone(out), [f.clone() for f in feats]
