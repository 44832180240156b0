"""ShuffleNet (v1, groups 3) for CIFAR: ``ShuffleV1`` (arXiv 1707.01083).

Parameter names follow mdistiller's ``models/cifar/ShuffleNetv1.py``
(``layer<k>.<i>.conv1`` ... ``linear``).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .common import ChannelShuffle, Concat, TapModel
from .registry import register_model


class Bottleneck(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1.

    With stride 2 the shortcut is a 3x3 average pool whose output is
    concatenated to the branch (so ``out_planes`` is the branch width only).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        # The stem has 24 channels, too few for grouped convolution.
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.concat = Concat(1)
        self.relu = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU()  # its input, the pre-activation, is a tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = self.concat((out, res)) if self.stride == 2 else out + res
        return self.relu_out(preact)


class ShuffleNet(TapModel):
    """Input ``(N, 3, 32, 32)``, output logits ``(N, num_classes)``.

    Features: stem ``(N, 24, 32, 32)``, stages ``(N, 240, 16, 16)``,
    ``(N, 480, 8, 8)``, ``(N, 960, 4, 4)``; pooled ``(N, 960)``.
    """

    def __init__(self, out_planes: Sequence[int], num_blocks: Sequence[int], groups: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # a 4x4 map at 32 px
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.stage_channels = [24] + list(out_planes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The first block concatenates its input, so its branch makes the rest.
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=2 if i == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def _stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def _feat_taps(self):
        return ["relu", "layer1", "layer2", "layer3"]

    def _preact_taps(self):
        return ["relu"] + [f"layer{i + 1}.{len(s) - 1}.relu_out:in" for i, s in enumerate(self._stages())]

    def _pooled_tap(self):
        return "linear:in"

    def get_bn_before_relu(self):
        raise NotImplementedError("ShuffleV1 has no BN right before its stage ReLUs; it cannot be an OFD teacher")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model("ShuffleV1", "cifar")
def shufflev1(num_classes: int = 100) -> ShuffleNet:
    return ShuffleNet(out_planes=[240, 480, 960], num_blocks=[4, 8, 4], groups=3, num_classes=num_classes)
