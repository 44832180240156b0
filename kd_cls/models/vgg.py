"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19).

Five conv blocks; each block's final ReLU is outside the block so its
pre-activation can be tapped. Parameter names follow mdistiller's
``models/cifar/vgg.py`` (``block0.0.weight`` ... ``classifier.weight``).
The registered names are mdistiller's: ``vgg13`` is its ``vgg13_bn``, etc.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .common import TapModel, fan_out_normal_init
from .registry import register_model

# Output widths of the convolutions of each of the five blocks.
CONFIGS = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: Sequence[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    """conv(-BN)-ReLU repeated, without the last ReLU."""
    layers: List[nn.Module] = []
    for v in widths:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(TapModel):
    """Input ``(N, 3, 32, 32)`` (or 64x64), output logits ``(N, num_classes)``.

    Features at 32 px: ``(N, 64, 32, 32)``, ``(N, 128, 16, 16)``, ``(N, 256, 8, 8)``,
    ``(N, 512, 4, 4)``, ``(N, 512, 4, 4)``; pooled ``(N, 512)``. At 64 px one
    more max-pool runs before the last block (``pool3``), as in mdistiller.
    """

    def __init__(self, cfg: Sequence[Sequence[int]], batch_norm: bool = False, num_classes: int = 1000):
        super().__init__()
        in_ch = [3] + [c[-1] for c in cfg[:-1]]
        for i in range(5):
            setattr(self, f"block{i}", _make_block(cfg[i], batch_norm, in_ch[i]))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        # Each block's final ReLU; not in place, their inputs are taps.
        self.relus = nn.ModuleList([nn.ReLU() for _ in range(5)])
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(512, num_classes)
        self.stage_channels = [c[-1] for c in cfg]
        fan_out_normal_init(self, linear_std=0.01)

    def _blocks(self) -> List[nn.Sequential]:
        return [self.block0, self.block1, self.block2, self.block3, self.block4]

    def _feat_taps(self):
        return [f"relus.{i}" for i in range(5)]

    def _preact_taps(self):
        return ["relus.0"] + [f"block{i}" for i in range(1, 5)]

    def _pooled_tap(self):
        return "classifier:in"

    def get_bn_before_relu(self) -> List[nn.Module]:
        """The last layer of blocks 1-4 (a BN for the batch-norm variants)."""
        return [b[-1] for b in self._blocks()[1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.relus[0](self.block0(x)))
        x = self.pool1(self.relus[1](self.block1(x)))
        x = self.pool2(self.relus[2](self.block2(x)))
        x = self.relus[3](self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.relus[4](self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


def _register(name: str, cfg_key: str, teacher: bool = False):
    weights = f"download_ckpts/cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth" if teacher else None

    def build(num_classes: int = 100) -> VGG:
        return VGG(CONFIGS[cfg_key], batch_norm=True, num_classes=num_classes)

    build.__name__ = name
    build.__doc__ = f"VGG (config {cfg_key!r}) with batch norm."
    return register_model(name, "cifar", weights=weights)(build)


vgg8 = _register("vgg8", "S")
vgg11 = _register("vgg11", "A")
vgg13 = _register("vgg13", "B", teacher=True)
vgg16 = _register("vgg16", "D")
vgg19 = _register("vgg19", "E")
