"""MobileNetV2 for CIFAR (``MobileNetV2`` = mdistiller's ``mobile_half``: expansion 6, width 0.5).

Parameter names follow mdistiller's ``models/cifar/mobilenetv2.py``
(``conv1``, ``blocks.<stage>.<i>.conv.<k>``, ``conv2``, ``classifier.0``).
The Tiny-ImageNet variant, a different network, is in ``mobilenetv2_tiny.py``.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .common import TapModel, fan_out_normal_init
from .registry import register_model

# expansion t (None: the model's T), output channels c (at width 1.0), repeats n, first stride s
INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [None, 24, 2, 1],
    [None, 32, 3, 2],
    [None, 64, 4, 2],
    [None, 96, 3, 1],
    [None, 160, 3, 2],
    [None, 320, 1, 1],
]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, with identity shortcut when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(TapModel):
    """Input ``(N, 3, 32, 32)``, output logits ``(N, num_classes)``.

    Features (width 0.5): stem ``(N, 16, 16, 16)``, then the outputs of blocks
    1, 2, 4, 6: ``(N, 12, 16, 16)``, ``(N, 16, 8, 8)``, ``(N, 48, 4, 4)``,
    ``(N, 160, 2, 2)``; pooled ``(N, 1280)``. Blocks end in a linear projection,
    so their outputs already are pre-activations: ``preact_feats`` equals
    ``feats`` (mdistiller defines none for this model).
    """

    def __init__(self, T: int, feature_dim: int, input_size: int = 32, width_mult: float = 1.0, remove_avg: bool = False):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"MobileNetV2 input_size must be a multiple of 32, got {input_size}")
        self.remove_avg = remove_avg
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            t = T if t is None else t
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        # The map is 2x2 at 32 px; adaptive pooling gives the same mean there.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.stage_channels = [int(c * width_mult) for c in (32, 24, 32, 96, 320)]
        fan_out_normal_init(self, linear_std=0.01)

    _FEAT_BLOCKS = (1, 2, 4, 6)

    def _feat_taps(self):
        return ["conv1"] + [f"blocks.{i}" for i in self._FEAT_BLOCKS]

    def _preact_taps(self):
        return self._feat_taps()

    def _pooled_tap(self):
        return "classifier:in"

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in self._FEAT_BLOCKS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        if not self.remove_avg:
            x = self.avgpool(x)
        return self.classifier(self.flatten(x))


def mobilenetv2_T_w(T: int, W: float, feature_dim: int = 100) -> MobileNetV2:
    return MobileNetV2(T=T, feature_dim=feature_dim, width_mult=W)


@register_model("MobileNetV2", "cifar")
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return mobilenetv2_T_w(6, 0.5, num_classes)
