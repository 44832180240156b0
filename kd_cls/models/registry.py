"""Model zoo registry: (family, name) -> constructor, in the style of timm.

A family is the input regime a model is built for: ``cifar`` (32x32, also used
for the ``digits`` dataset), ``imagenet`` (224x224) and ``tiny_imagenet``
(64x64). A dataset names its family (see ``kd_cls.data``).

Every zoo model returns plain logits from ``forward`` and declares where its
features are, as hook taps (see ``kd_cls.hooks``), through ``tap_points()``::

    {"feats": [stem, stage1, ..., stageK],           # post-activation stage outputs
     "preact_feats": [stem, stage1_pre, ...],        # the same before the final ReLU
     "pooled_feat": "fc:in"}                         # the (N, D) input of the classifier

so distillers read features through hooks and no ``forward`` is edited.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torch import nn

from kd_cls.data.registry import get_dataset_info
from kd_cls.registry import Registry, UnknownNameError

FAMILIES = ("cifar", "imagenet", "tiny_imagenet")
_REGISTRIES: Dict[str, Registry] = {f: Registry(f"{f} model") for f in FAMILIES}
# Default checkpoint of a teacher, relative to the working directory (mdistiller's layout).
_DEFAULT_WEIGHTS: Dict[tuple, str] = {}


def register_model(name: Optional[str] = None, family: str = "cifar", weights: Optional[str] = None):
    """Register ``fn(num_classes=...) -> nn.Module`` under ``name`` in ``family``.

    ``weights`` is the teacher checkpoint path mdistiller uses for this model, if any.
    """
    if family not in _REGISTRIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")

    def deco(fn: Callable[..., nn.Module]):
        key = name or fn.__name__
        _REGISTRIES[family].register(key, fn)
        if weights:
            _DEFAULT_WEIGHTS[(family, key)] = weights
        return fn

    return deco


def _family_of(dataset: str) -> str:
    return get_dataset_info(dataset).model_family


def model_names(dataset: str = "cifar100") -> List[str]:
    return _REGISTRIES[_family_of(dataset)].names()


def build_model(name: str, num_classes: int = 100, dataset: str = "cifar100") -> nn.Module:
    """Build zoo model ``name`` for ``dataset`` with ``num_classes`` outputs.

    An unknown name raises ``UnknownNameError`` listing the valid names.
    """
    family = _family_of(dataset)
    reg = _REGISTRIES[family]
    if name not in reg:
        raise UnknownNameError(reg.unknown_message(name) + f" (dataset {dataset!r})")
    return reg.get(name)(num_classes=num_classes)


def default_weights(name: str, dataset: str = "cifar100") -> Optional[str]:
    """mdistiller's checkpoint path for teacher ``name`` on ``dataset``, or None."""
    return _DEFAULT_WEIGHTS.get((_family_of(dataset), name))


def get_taps(model: nn.Module) -> dict:
    """The tap points a model declares (see module docstring).

    Models outside the zoo (a torchvision model, say) can be used by features-free
    methods as they are, and by feature methods once they define ``tap_points()``.
    """
    fn = getattr(model, "tap_points", None)
    if fn is None:
        raise TypeError(
            f"{type(model).__name__} declares no tap points; define tap_points() returning "
            "{'feats': [...], 'preact_feats': [...], 'pooled_feat': '...'} with module paths"
        )
    return fn()

