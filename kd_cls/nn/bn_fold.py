"""Fast paths that leave results unchanged: BatchNorm folding for inference copies.

In eval mode a BatchNorm is an affine map per channel,
``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so when its input is the
output of a convolution (or linear layer) used by nothing else, it can be
folded into that layer's weight and bias::

    W' = W * s,   b' = (b - mean) * s + beta,   s = gamma / sqrt(var + eps)

``fold_batchnorm`` does this on a deep copy. The module tree keeps its paths:
each folded BatchNorm is replaced by ``nn.Identity()``, so a hook tap on the
BatchNorm's path (or on any later module) sees the same tensor as before,
within float rounding. The original model is never touched, so checkpoints
keep it as loaded and methods that read BN statistics (OFD) still see them.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Iterable, List, Sequence

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_cls.hooks import parse_tap

__all__ = ["fold_batchnorm", "fold_into", "find_conv_bn_pairs", "fold_conflicts", "count_batchnorms", "state_fingerprint"]

logger = logging.getLogger(__name__)

# Layers whose output channels are dim 0 of the weight (transposed convs are not).
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_foldable_layer(m: nn.Module) -> bool:
    # Exact types only: a subclass may change ``forward`` (e.g. add its own norm).
    return type(m) in _FOLDABLE


def _is_foldable_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, _BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
        and not isinstance(m.running_mean, nn.parameter.UninitializedBuffer)
    )


def _traced_pairs(model: nn.Module) -> Dict[str, str]:
    graph = fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            # A parameter read directly elsewhere (weight tying): fold nothing there.
            owner = node.target.rsplit(".", 1)[0] if "." in node.target else ""
            calls[owner] = calls.get(owner, 0) + 2
    pairs: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_bn(modules.get(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        layer, bn = modules.get(src.target), modules[node.target]
        if layer is None or not _is_foldable_layer(layer) or len(src.users) != 1:
            continue
        if calls.get(src.target) != 1 or calls.get(node.target) != 1:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
            continue
        pairs[src.target] = node.target
    return pairs


def find_conv_bn_pairs(model: nn.Module, _prefix: str = "") -> Dict[str, str]:
    """``{layer_path: bn_path}`` for every BatchNorm that can be folded into the layer before it.

    A pair qualifies when, in the graph traced by ``torch.fx``, the BatchNorm's
    only input is the output of a ``Conv{1,2,3}d``/``Linear`` module, that
    output feeds nothing else, and each of the two modules is called exactly
    once per forward. A model that cannot be traced as a whole (data-dependent
    control flow) is searched child by child, so its traceable blocks still fold.
    """
    try:
        found = _traced_pairs(model)
    except Exception as e:  # untraceable: look inside
        if not _prefix:
            logger.debug("cannot trace %s as a whole (%s: %s); folding inside its traceable blocks",
                         type(model).__name__, type(e).__name__, e)
        found = {}
        for name, child in model.named_children():
            if next(child.children(), None) is not None:
                found.update(find_conv_bn_pairs(child, f"{_prefix}{name}."))
        return found
    return {f"{_prefix}{c}": f"{_prefix}{b}" for c, b in found.items()}


def fold_conflicts(pairs: Dict[str, str], taps: Iterable[str]) -> List[str]:
    """The taps whose value folding would change: a folded layer's output or its BN's input."""
    bad = []
    bn_paths = set(pairs.values())
    for tap in taps:
        path, is_input = parse_tap(tap)
        if (path in pairs and not is_input) or (path in bn_paths and is_input):
            bad.append(tap)
    return bad


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BN into ``layer`` (``weight`` with output channels on dim 0, optional ``bias``).

    ``bn`` needs ``running_mean``, ``running_var``, ``eps`` and optional affine
    ``weight``/``bias``: ``nn.BatchNorm*d`` and detectron2's ``FrozenBatchNorm2d`` both qualify.
    """
    # In float64, so the folded weights round once, not at every step.
    w = layer.weight.detach().double()
    mean = bn.running_mean.double()
    var = bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    new_w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    new_b = (b - mean) * scale + beta
    old_w = layer.weight
    new_w = new_w.to(old_w.dtype)
    if old_w.dim() == 4 and old_w.is_contiguous(memory_format=torch.channels_last):
        new_w = new_w.contiguous(memory_format=torch.channels_last)
    layer.weight = nn.Parameter(new_w, requires_grad=False)
    layer.bias = nn.Parameter(new_b.to(old_w.dtype), requires_grad=False)


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def fold_batchnorm(model: nn.Module, keep_taps: Sequence[str] = (), example_input=None,
                   channels_last: bool = False) -> nn.Module:
    """An eval-mode inference copy of ``model`` with BatchNorms folded into the layers before them.

    Args:
        model: any ``nn.Module``; it is deep-copied and never modified.
        keep_taps: hook taps (``"path"`` / ``"path:in"``) that must keep their
            value: a pair whose layer output or BN input is tapped stays unfolded.
        example_input: optional input batch (a tensor, or a tuple of positional
            arguments). When given, the copy's output is checked against the
            original's on it, and a mismatch (a forward that reuses a layer in a
            way tracing cannot see) returns the unfolded eval copy instead.
        channels_last: store the copy's 4-d weights in ``channels_last`` format.
            Convolutions then run in NHWC whatever the input's layout (faster on
            oneDNN CPUs and tensor cores); outputs are equal within rounding.

    Returns:
        The copy, in eval mode, every parameter with ``requires_grad=False``.
        ``copy.folded_pairs`` is ``{layer_path: bn_path}`` of what was folded.
    """
    folded = copy.deepcopy(model).eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    try:
        pairs = find_conv_bn_pairs(folded)
    except Exception as e:  # folding is optional; the copy stays exact without it
        logger.debug("BN folding skipped for %s (%s: %s)", type(model).__name__, type(e).__name__, e)
        pairs = {}
    keep = fold_conflicts(pairs, keep_taps)
    if keep:
        keep_paths = {parse_tap(t)[0] for t in keep}
        pairs = {c: b for c, b in pairs.items() if c not in keep_paths and b not in keep_paths}
    plain = copy.deepcopy(folded) if (example_input is not None and pairs) else None
    for layer_path, bn_path in pairs.items():
        fold_into(folded.get_submodule(layer_path), folded.get_submodule(bn_path))
        _set_module(folded, bn_path, nn.Identity())
    if plain is not None and not _same_outputs(plain, folded, example_input):
        logger.warning("BN folding changed the output of %s; using the unfolded copy", type(model).__name__)
        folded, pairs = plain, {}
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    folded.folded_pairs = dict(pairs)
    folded.kept_taps = tuple(keep_taps)
    if pairs:
        logger.debug("folded %d BatchNorms of %s", len(pairs), type(model).__name__)
    return folded


def _tensors(out) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _same_outputs(a: nn.Module, b: nn.Module, example_input) -> bool:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.inference_mode():
        ya, yb = _tensors(a(*args)), _tensors(b(*args))
    if len(ya) != len(yb):
        return False
    for x, y in zip(ya, yb):
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
            if not torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-3 * scale):
                return False
    return True


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm modules in ``model``."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def state_fingerprint(module: nn.Module) -> tuple:
    """What an inference copy of ``module`` depends on: each parameter's and buffer's storage
    address, in-place version counter, device and dtype.

    It changes when a tensor is modified in place (``load_state_dict``, an
    optimizer step, ``copy_``), replaced (``assign=True``) or moved (``.to``),
    so comparing it with the value at build time tells whether a copy is stale.
    """
    tensors = list(module.parameters()) + list(module.buffers())
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
