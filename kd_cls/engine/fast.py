"""Fast paths that leave results unchanged (placeholder until BN folding lands)."""
import copy

from torch import nn


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode inference copy of ``model``; ``model`` is not modified."""
    return copy.deepcopy(model).eval()
