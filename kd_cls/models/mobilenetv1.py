"""MobileNetV1 for ImageNet (arXiv 1704.04861), the ResNet50 -> MobileNetV1 student.

Parameter names follow mdistiller's ``models/imagenet/mobilenetv1.py``
(``model.<i>.<k>`` and ``fc``). The final ReLU of the four tapped units is
not in place, so their pre-activations can be read by hooks.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .common import TapModel
from .registry import register_model

# Units whose outputs are the features (stride 4, 8, 16, 32 ends of stages).
FEAT_UNITS = (3, 5, 11, 13)

# (in, out, stride) of the depthwise-separable units after the stem.
_DW_UNITS = [
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2), (1024, 1024, 1),
]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_dw(inp: int, oup: int, stride: int, tapped: bool = False) -> nn.Sequential:
    """3x3 depthwise - BN - ReLU - 1x1 pointwise - BN - ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=not tapped),
    )


class MobileNetV1(TapModel):
    """Input ``(N, 3, 224, 224)``, output logits ``(N, num_classes)``.

    Features: ``(N, 128, 56, 56)``, ``(N, 256, 28, 28)``, ``(N, 512, 14, 14)``,
    ``(N, 1024, 7, 7)``; pooled ``(N, 1024)``. mdistiller's classifier always
    had 1000 outputs; here ``num_classes`` sets it (1000 by default).
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        units: List[nn.Module] = [conv_bn(3, 32, 2)]
        for i, (inp, oup, stride) in enumerate(_DW_UNITS, start=1):
            units.append(conv_dw(inp, oup, stride, tapped=i in FEAT_UNITS))
        units.append(nn.AdaptiveAvgPool2d(1))  # a 7x7 map at 224 px
        self.model = nn.Sequential(*units)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(1024, num_classes)
        self.stage_channels = [128, 256, 512, 1024]

    def _feat_taps(self):
        return [f"model.{i}" for i in FEAT_UNITS]

    def _preact_taps(self):
        return [f"model.{i}.5:in" for i in FEAT_UNITS]

    def _pooled_tap(self):
        return "fc:in"

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.model[i][-2] for i in FEAT_UNITS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.model(x)))


@register_model("MobileNetV1", "imagenet")
def mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes)
