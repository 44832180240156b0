"""Pieces shared by the zoo families: tap declarations and weight initialisation.

Zoo models keep mdistiller's parameter names, so its checkpoints load with
``strict=True``. Features that mdistiller computes functionally (a final
``F.relu``, a reshape) are parameter-free modules here (``nn.ReLU()``,
``nn.Flatten()``) so that a hook can reach them without renaming a parameter.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn


class TapModel(nn.Module):
    """Base for zoo models: ``tap_points()`` from three class-specific lists.

    Subclasses set ``self.stage_channels`` and implement ``_feat_taps()``,
    ``_preact_taps()`` and ``_pooled_tap()``.
    """

    stage_channels: List[int]

    def _feat_taps(self) -> List[str]:
        raise NotImplementedError

    def _preact_taps(self) -> List[str]:
        raise NotImplementedError

    def _pooled_tap(self) -> str:
        raise NotImplementedError

    def tap_points(self) -> dict:
        """Hook taps equal to mdistiller's ``feats`` dict entries.

        ``feats``: post-activation stem and stage outputs, ``preact_feats``: the
        same before the final ReLU (the stem is repeated as is), ``pooled_feat``:
        the ``(N, D)`` classifier input.
        """
        return {
            "feats": self._feat_taps(),
            "preact_feats": self._preact_taps(),
            "pooled_feat": self._pooled_tap(),
        }

    def get_stage_channels(self) -> List[int]:
        """Channels of each entry of ``feats`` (mdistiller's ``stage_channels``)."""
        return list(self.stage_channels)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (followed by a BatchNorm)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def make_projection_stage(block, inplanes: int, planes: int, blocks: int, stride: int = 1):
    """A ResNet stage of ``blocks`` blocks; the first gets a 1x1 conv + BN shortcut when its shape changes.

    ``block(inplanes, planes, stride, downsample)`` builds one block. Returns
    ``(stage, out_channels)`` with ``out_channels = planes * block.expansion``.
    The module names (``<i>.downsample.0``, ...) are those of mdistiller and torchvision.
    """
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


def kaiming_init(model: nn.Module) -> None:
    """He init of convolutions (fan_out), unit/zero BN, as in torchvision's ResNet."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def fan_out_normal_init(model: nn.Module, linear_std: Optional[float] = None, zero_linear_bias: bool = True) -> None:
    """Normal(0, sqrt(2 / (k*k*out))) convolutions with zero biases, unit/zero BN.

    ``linear_std``: if given, Linear weights are drawn from Normal(0, std),
    otherwise they keep PyTorch's default; ``zero_linear_bias`` zeroes Linear
    biases. (The recipe of the WRN, VGG, MobileNetV2 and ImageNet ResNet papers' code.)
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if zero_linear_bias and m.bias is not None:
                nn.init.zeros_(m.bias)


class Concat(nn.Module):
    """``torch.cat(tensors, dim)`` as a module, so that a hook can see the result."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, tensors):
        return torch.cat(list(tensors), self.dim)


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: ``(N, g*c, H, W) -> (N, c*g, H, W)`` interleaving the groups."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
