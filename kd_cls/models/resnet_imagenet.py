"""ImageNet ResNet18/34/50/101 with torchvision's parameter names (its ``.pth`` files load).

As in mdistiller's ``models/imagenet/resnet.py``, a residual block returns its
sum before the ReLU and the next block (or the head) applies it, so every
stage output is a pre-activation and the ReLU'd version is the next module's
output; the network computes exactly torchvision's function.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .common import TapModel, conv3x3, fan_out_normal_init, make_projection_stage
from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        # Not in place: its input is the previous block's output, a tap.
        self.relu_in = nn.ReLU()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_in(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.relu_in = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_in(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))


class ResNet(TapModel):
    """Input ``(N, 3, 224, 224)``, output logits ``(N, num_classes)``.

    Features: stem ``(N, 64, 112, 112)`` and four stages at 56, 28, 14, 7 px
    with ``64..512`` planes times the block expansion; pooled ``(N, 512 * expansion)``.
    ``preact_feats[0]`` is the stem after its ReLU, as in mdistiller (whose
    in-place ReLU overwrote the saved pre-activation); OFD skips that entry.
    ``get_stage_channels()``: the four stage widths (mdistiller reported
    ResNet50's for every depth; ours are each network's own).
    """

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.relu_out = nn.ReLU()  # its input, layer4's output, is a tap
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # a 7x7 map at 224 px
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = [p * block.expansion for p in (64, 128, 256, 512)]
        fan_out_normal_init(self, zero_linear_bias=False)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        stage, self.inplanes = make_projection_stage(block, self.inplanes, planes, blocks, stride)
        return stage

    def _feat_taps(self):
        # ReLU of a stage output = output of the next stage's first relu_in.
        return ["relu", "layer2.0.relu_in", "layer3.0.relu_in", "layer4.0.relu_in", "relu_out"]

    def _preact_taps(self):
        return ["relu", "layer1", "layer2", "layer3", "layer4"]

    def _pooled_tap(self):
        return "fc:in"

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """Last BN of stages 2-4 (mdistiller leaves stage 1 out)."""
        return [layer[-1].last_bn() for layer in (self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(self.relu_out(x))))


@register_model("ResNet18", "imagenet")
def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


@register_model("ResNet34", "imagenet")
def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)


@register_model("ResNet50", "imagenet")
def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


@register_model("ResNet101", "imagenet")
def resnet101(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes)
