"""ResNet18 / ResNet50 for 32x32 (CIFAR) and 64x64 (Tiny-ImageNet) inputs.

The ImageNet layout (four stages, 64..512 planes) with a 3x3 stride-1 stem and
no max-pool, as in mdistiller's ``models/cifar/resnetv2.py`` (parameter names
kept: ``shortcut`` branches and a ``linear`` classifier). The head pools
adaptively, so the same network runs at 32 and 64 pixels.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .common import TapModel, kaiming_init
from .registry import register_model


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()  # identity, kept as an empty Sequential for the names
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)
        self.relu = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU()  # its input, the pre-activation, is a tap

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_planes, planes * 4, stride)
        self.relu = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + self.shortcut(x))


class ResNetV2(TapModel):
    """Input ``(N, 3, H, W)`` (H = 32 or 64), output logits ``(N, num_classes)``.

    Features: stem ``(N, 64, H, W)`` then four stages with strides 1, 2, 2, 2
    (``64..512`` planes times the block expansion); pooled ``(N, 512 * expansion)``.
    ``get_stage_channels()`` lists the four stage widths (not the stem), as in
    mdistiller, whose ResNet18 reported ResNet50's widths; ours reports its own.
    """

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int = 10, zero_init_residual: bool = False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = [p * block.expansion for p in (64, 128, 256, 512)]
        kaiming_init(self)
        if zero_init_residual:  # each residual branch starts as zero (arXiv 1706.02677)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def _stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _feat_taps(self):
        return ["relu", "layer1", "layer2", "layer3", "layer4"]

    def _preact_taps(self):
        return ["relu"] + [f"layer{i + 1}.{len(s) - 1}.relu_out:in" for i, s in enumerate(self._stages())]

    def _pooled_tap(self):
        return "linear:in"

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """The last BN of each stage (its output precedes the stage's final ReLU)."""
        return [s[-1].last_bn() for s in self._stages()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model("ResNet18", "cifar")
def resnet18_cifar(num_classes: int = 100) -> ResNetV2:
    return ResNetV2(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


@register_model("ResNet50", "cifar", weights="download_ckpts/cifar_teachers/ResNet50_vanilla/ckpt_epoch_240.pth")
def resnet50_cifar(num_classes: int = 100) -> ResNetV2:
    return ResNetV2(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


@register_model("ResNet18", "tiny_imagenet", weights="download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18")
def resnet18_tiny(num_classes: int = 200) -> ResNetV2:
    """mdistiller's Tiny-ImageNet teacher is the CIFAR ResNet18 run at 64x64 (8x8 before pooling)."""
    return ResNetV2(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
