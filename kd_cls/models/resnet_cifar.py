"""CIFAR ResNets of the CRD / mdistiller zoo (resnet8 ... resnet110, resnet8x4, resnet32x4).

Three stages of 6n+2 (basic block) layers on 32x32 inputs; ``num_filters`` is
``[stem, stage1, stage2, stage3]``. Parameter names follow mdistiller's
``models/cifar/resnet.py`` so its checkpoints load unchanged.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .common import TapModel, conv3x3, kaiming_init, make_projection_stage
from .registry import register_model

_TEACHERS = "download_ckpts/cifar_teachers/{}_vanilla/ckpt_epoch_240.pth"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        # Not in place: its input is the block's pre-activation, a tap.
        self.relu_out = nn.ReLU()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.relu_out = nn.ReLU()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + shortcut)


class ResNet(TapModel):
    """CIFAR ResNet: input ``(N, 3, 32, 32)``, output logits ``(N, num_classes)``.

    Features: stem ``(N, f0, 32, 32)``, stages ``(N, f1, 32, 32)``,
    ``(N, f2, 16, 16)``, ``(N, f3, 8, 8)``; pooled ``(N, f3 * expansion)``.
    """

    def __init__(self, depth: int, num_filters: Sequence[int], block_name: str = "BasicBlock", num_classes: int = 10):
        super().__init__()
        kind = block_name.lower()
        if kind == "basicblock":
            if (depth - 2) % 6:
                raise ValueError(f"basic-block ResNet depth must be 6n+2, got {depth}")
            block, n = BasicBlock, (depth - 2) // 6
        elif kind == "bottleneck":
            if (depth - 2) % 9:
                raise ValueError(f"bottleneck ResNet depth must be 9n+2, got {depth}")
            block, n = Bottleneck, (depth - 2) // 9
        else:
            raise ValueError(f"unknown block_name {block_name!r}; valid: BasicBlock, Bottleneck")
        self.num_blocks = n
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        self.stage_channels = list(num_filters)
        kaiming_init(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        stage, self.inplanes = make_projection_stage(block, self.inplanes, planes, blocks, stride)
        return stage

    def _stages(self) -> List[str]:
        return ["layer1", "layer2", "layer3"]

    def _feat_taps(self):
        return ["relu"] + self._stages()

    def _preact_taps(self):
        last = self.num_blocks - 1
        return ["relu"] + [f"{s}.{last}.relu_out:in" for s in self._stages()]

    def _pooled_tap(self):
        return "fc:in"

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """The last BN of each stage's last block (its output precedes the stage's final ReLU)."""
        return [getattr(self, s)[-1].last_bn() for s in self._stages()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _register(name: str, depth: int, filters: Sequence[int], teacher: bool = False):
    def build(num_classes: int = 100) -> ResNet:
        return ResNet(depth, filters, "basicblock", num_classes=num_classes)

    build.__name__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}, filters {list(filters)}."
    register_model(name, "cifar", weights=_TEACHERS.format(name) if teacher else None)(build)
    return build


resnet8 = _register("resnet8", 8, [16, 16, 32, 64])
resnet14 = _register("resnet14", 14, [16, 16, 32, 64])
resnet20 = _register("resnet20", 20, [16, 16, 32, 64])
resnet32 = _register("resnet32", 32, [16, 16, 32, 64])
resnet44 = _register("resnet44", 44, [16, 16, 32, 64])
resnet56 = _register("resnet56", 56, [16, 16, 32, 64], teacher=True)
resnet110 = _register("resnet110", 110, [16, 16, 32, 64], teacher=True)
resnet8x4 = _register("resnet8x4", 8, [32, 64, 128, 256])
resnet32x4 = _register("resnet32x4", 32, [32, 64, 128, 256], teacher=True)
