"""Capture intermediate features with forward hooks, without editing ``forward``.

A *tap* names a submodule by its dotted path (as in ``model.named_modules()``),
optionally followed by ``:in`` to take the module's first positional input
instead of its output::

    "layer2"            output of model.layer2
    "layer3.4"          output of the 5th block of layer3
    "fc:in"             input of the classifier (the pooled feature)
    "layer1.2.relu_out:in"  input of a final activation (a pre-activation)

A tap on an input must name a module that does not modify its input in place
(an ``nn.ReLU(inplace=True)`` would overwrite the captured tensor).

``FeatureCapture`` is a context manager: hooks are registered on enter and
removed on exit, so the model is left as it was found::

    with FeatureCapture(model, ["layer1", "layer2", "fc:in"]) as cap:
        logits = model(x)
    feats = cap.features   # {"layer1": Tensor, "layer2": Tensor, "fc:in": Tensor}

It can also stay attached (``cap.attach()`` / ``cap.detach()``) for models that
run every step; ``cap.clear()`` then drops the previous step's tensors.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

INPUT_SUFFIX = ":in"


def parse_tap(tap: str) -> Tuple[str, bool]:
    """Split ``"path:in"`` into ``("path", True)`` and ``"path"`` into ``("path", False)``."""
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    return tap, False


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at dotted ``path``; ``""`` is the model itself.

    Raises a one-line ``KeyError`` that names the path and nearby valid paths.
    """
    if path == "":
        return model
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    import difflib

    close = difflib.get_close_matches(path, list(modules), n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise KeyError(f"module path {path!r} not found in {type(model).__name__}.{hint}")


class FeatureCapture:
    """Record the outputs (or inputs) of submodules named by taps.

    Args:
        model: any ``nn.Module``.
        taps: tap strings (see module docstring). Duplicates are captured once.
        detach: store ``tensor.detach()`` instead of the graph-connected tensor
            (for a teacher whose features need no gradient).
    """

    def __init__(self, model: nn.Module, taps: Iterable[str], detach: bool = False):
        self.model = model
        self.taps: List[str] = list(dict.fromkeys(taps))
        self.detach = detach
        self.features: Dict[str, torch.Tensor] = {}
        self._handles: list = []
        # Resolve now so that a bad path fails at construction, not mid-training.
        self._targets = [(tap, *self._resolve(tap)) for tap in self.taps]

    def _resolve(self, tap: str):
        path, is_input = parse_tap(tap)
        return resolve_module(self.model, path), is_input

    def _store(self, tap: str, value):
        if isinstance(value, (tuple, list)):
            value = value[0]
        if self.detach and torch.is_tensor(value):
            value = value.detach()
        self.features[tap] = value

    def attach(self) -> "FeatureCapture":
        if self._handles:
            return self
        for tap, module, is_input in self._targets:
            if is_input:
                h = module.register_forward_pre_hook(
                    lambda m, args, tap=tap: self._store(tap, args[0] if args else None)
                )
            else:
                h = module.register_forward_hook(lambda m, args, out, tap=tap: self._store(tap, out))
            self._handles.append(h)
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self.features = {}

    def __enter__(self) -> "FeatureCapture":
        self.clear()
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach_hooks()

    def get(self, taps: Sequence[str]) -> List[torch.Tensor]:
        """Captured tensors in the order of ``taps``; a missing one is an error."""
        missing = [t for t in taps if t not in self.features]
        if missing:
            raise RuntimeError(
                f"taps {missing} did not fire during forward; check that these modules run"
            )
        return [self.features[t] for t in taps]


def run_and_capture(
    model: nn.Module, taps: Sequence[str], *args, detach: bool = False, **kwargs
) -> Tuple[object, List[torch.Tensor]]:
    """Run ``model(*args, **kwargs)`` once and return ``(output, [features in taps order])``."""
    with FeatureCapture(model, taps, detach=detach) as cap:
        out = model(*args, **kwargs)
    return out, cap.get(taps)
