"""ShuffleNetV2 (1x) for CIFAR and Tiny-ImageNet: ``ShuffleV2`` (arXiv 1807.11164).

Parameter names follow mdistiller's ``models/cifar/ShuffleNetv2.py``. The head
pools adaptively to 1x1, so the network also runs at 64x64 (mdistiller's fixed
4x4 pooling leaves a 2x2 map there, 4096 features for a 1024-input classifier);
at 32x32 both poolings are the same mean over the 4x4 map.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .common import ChannelShuffle, Concat, TapModel
from .registry import register_model

# net_size -> widths of the three stages and of the last 1x1 conv, blocks per stage
CONFIGS = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class BasicBlock(nn.Module):
    """Split channels in halves; transform the second, concatenate, shuffle.

    In the last block of a stage, ``concat`` builds the stage's pre-activation
    (the first half next to the transformed half before its ReLU) for a tap.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        # Fixed at construction (not read from the input) so torch.fx can trace the block.
        self.split_channels = c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU()  # bn3's output is part of the pre-activation tap
        self.concat = Concat(1)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.split_channels], x[:, self.split_channels :]
        out = self.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        if self.is_last:
            self.concat((x1, pre))
        return self.shuffle(torch.cat([x1, self.relu_out(pre)], 1))


class DownBlock(nn.Module):
    """Stride-2 unit: both branches downsample, outputs are concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(TapModel):
    """Input ``(N, 3, H, W)`` (H = 32 or 64), output logits ``(N, num_classes)``.

    Features (1x, 32 px): stem ``(N, 24, 32, 32)``, stages ``(N, 116, 16, 16)``,
    ``(N, 232, 8, 8)``, ``(N, 464, 4, 4)``; pooled ``(N, 1024)``.
    """

    def __init__(self, net_size: float = 1, num_classes: int = 10):
        super().__init__()
        if net_size not in CONFIGS:
            raise ValueError(f"unknown ShuffleNetV2 net_size {net_size!r}; valid: {', '.join(map(str, CONFIGS))}")
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.stage_channels = [24] + list(out_channels[:-1])

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: List[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels, is_last=(i == num_blocks - 1)) for i in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def _stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def _feat_taps(self):
        return ["relu", "layer1", "layer2", "layer3"]

    def _preact_taps(self):
        return ["relu"] + [f"layer{i + 1}.{len(s) - 1}.concat" for i, s in enumerate(self._stages())]

    def _pooled_tap(self):
        return "linear:in"

    def get_bn_before_relu(self):
        raise NotImplementedError("ShuffleV2 has no BN right before its stage ReLUs; it cannot be an OFD teacher")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model("ShuffleV2", "cifar")
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(net_size=1, num_classes=num_classes)


@register_model("ShuffleV2", "tiny_imagenet")
def shufflev2_tiny(num_classes: int = 200) -> ShuffleNetV2:
    return ShuffleNetV2(net_size=1, num_classes=num_classes)
