"""MobileNetV2 for Tiny-ImageNet (mdistiller's ``mv2_tinyimagenet``), registered as ``MobileNetV2``.

Width 1.0, ReLU6, biased convolutions and a 1x1-conv classifier; parameter
names follow mdistiller (``pre``, ``stage1`` ... ``stage7``, ``conv1``, ``conv2``).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import TapModel
from .registry import register_model


class LinearBottleNeck(nn.Module):
    """1x1 expand (ReLU6) - 3x3 depthwise (ReLU6) - 1x1 linear, identity shortcut when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, t: int = 6):
        super().__init__()
        hidden = in_channels * t
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.stride = stride
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.stride == 1 and self.in_channels == self.out_channels:
            out = out + x
        return out


def _stage(repeat: int, in_channels: int, out_channels: int, stride: int, t: int) -> nn.Sequential:
    layers = [LinearBottleNeck(in_channels, out_channels, stride, t)]
    layers += [LinearBottleNeck(out_channels, out_channels, 1, t) for _ in range(repeat - 1)]
    return nn.Sequential(*layers)


class MobileNetV2Tiny(TapModel):
    """Input ``(N, 3, 64, 64)``, output logits ``(N, num_classes)``.

    The stem is a padded 1x1 conv, so maps are 66, 33, 17, 9 pixels wide.
    Features: stem ``(N, 32, 66, 66)``, ``(N, 24, 33, 33)``, ``(N, 32, 17, 17)``,
    ``(N, 64, 9, 9)``, last conv ``(N, 1280, 9, 9)``; pooled ``(N, 1280)``
    (mdistiller keeps it as ``(N, 1280, 1, 1)``: same values).
    ``preact_feats`` equals ``feats``: mdistiller defines none for this model.
    """

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = _stage(2, 16, 24, 2, 6)
        self.stage3 = _stage(3, 24, 32, 2, 6)
        self.stage4 = _stage(4, 32, 64, 2, 6)
        self.stage5 = _stage(3, 64, 96, 1, 6)
        self.stage6 = _stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.conv2 = nn.Conv2d(1280, num_classes, 1)
        self.stage_channels = [32, 24, 32, 64, 1280]

    def _feat_taps(self):
        return ["pre", "stage2", "stage3", "stage4", "conv1"]

    def _preact_taps(self):
        return self._feat_taps()

    def _pooled_tap(self):
        return "flatten"

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` from the pooled feature ``(N, 1280)``."""
        return self.conv2(pooled[:, :, None, None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for i in range(1, 8):
            x = getattr(self, f"stage{i}")(x)
        x = self.conv1(x)
        return self.classify(self.flatten(self.avgpool(x)))


@register_model("MobileNetV2", "tiny_imagenet")
def mobilenetv2_tinyimagenet(num_classes: int = 200) -> MobileNetV2Tiny:
    return MobileNetV2Tiny(num_classes=num_classes)
