"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2; arXiv 1605.07146).

Pre-activation blocks (BN-ReLU-conv). Parameter names follow mdistiller's
``models/cifar/wrn.py`` (``block1.layer.0.bn1``, ``convShortcut``, ``bn1``, ``fc``).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .common import TapModel, fan_out_normal_init
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        # Not in place: the input of relu1 in a stage's first block is a tap
        # (the previous stage's pre-activation).
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # With equal widths the shortcut is the raw input; otherwise both paths
        # start from the activated input.
        shortcut = x if self.equalInOut else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, block, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(TapModel):
    """Input ``(N, 3, 32, 32)``, output logits ``(N, num_classes)``.

    Features: stem ``(N, 16, 32, 32)``, stages ``(N, 16k, 32, 32)``,
    ``(N, 32k, 16, 16)``, ``(N, 64k, 8, 8)`` (k = widen factor); pooled ``(N, 64k)``.
    Stage outputs are pre-activation sums; ``preact_feats`` holds them after the
    BN that follows (the next stage's first ``bn1``, or the final ``bn1``).
    """

    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], BasicBlock, 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], BasicBlock, 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], BasicBlock, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()  # its input (BN of the last stage) is a tap
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        self.stage_channels = ch
        fan_out_normal_init(self)

    def _feat_taps(self):
        return ["conv1", "block1", "block2", "block3"]

    def _preact_taps(self):
        return ["conv1", "block2.layer.0.relu1:in", "block3.layer.0.relu1:in", "relu:in"]

    def _pooled_tap(self):
        return "fc:in"

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.avgpool(x)))


def _register(depth: int, widen: int, teacher: bool = False):
    name = f"wrn_{depth}_{widen}"
    weights = f"download_ckpts/cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth" if teacher else None

    def build(num_classes: int = 100) -> WideResNet:
        return WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen)

    build.__name__ = name
    build.__doc__ = f"WRN-{depth}-{widen} for CIFAR."
    return register_model(name, "cifar", weights=weights)(build)


wrn_16_1 = _register(16, 1)
wrn_16_2 = _register(16, 2)
wrn_40_1 = _register(40, 1)
wrn_40_2 = _register(40, 2, teacher=True)
