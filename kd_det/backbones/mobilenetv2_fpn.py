"""MobileNetV2 (Sandler et al., CVPR 2018, arXiv 1801.04381) + FPN for detectron2.

Registered as ``build_mobilenetv2_backbone`` (bottom-up only) and
``build_mobilenetv2_fpn_backbone`` (with FPN p2-p6). Config:
``MODEL.MOBILENETV2.OUT_FEATURES`` (subset of m2..m5, strides 4/8/16/32),
``MODEL.MOBILENETV2.NORM`` (``FrozenBN``, ``BN``, ``GN``, ``SyncBN``...),
``MODEL.MOBILENETV2.WIDTH_MULT`` and ``MODEL.BACKBONE.FREEZE_AT`` (0: train all;
k >= 1: freeze the stem and stages m2..mk).

Module names follow mdistiller's MobileNetV2 (``features.<i>.conv.<j>``) so
its released checkpoints load.
"""
from __future__ import annotations

import math

from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from kd_cls.config import ConfigError

# (expansion t, channels c, repeats n, first stride s, name of the output after this group)
_SETTINGS = (
    (1, 16, 1, 1, ""),
    (6, 24, 2, 2, "m2"),
    (6, 32, 3, 2, "m3"),
    (6, 64, 4, 2, ""),
    (6, 96, 3, 1, "m4"),
    (6, 160, 3, 2, ""),
    (6, 320, 1, 1, "m5"),
)
STAGE_NAMES = ("m2", "m3", "m4", "m5")


def _divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10%."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_norm(cin, cout, k, stride, norm, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), get_norm(norm, cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear); identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm: str):
        super().__init__()
        hidden = round(cin * expand)
        self.identity = stride == 1 and cin == cout
        layers = [] if expand == 1 else _conv_norm(cin, hidden, 1, 1, norm)
        layers += _conv_norm(hidden, hidden, 3, stride, norm, groups=hidden)
        layers += _conv_norm(hidden, cout, 1, 1, norm, act=False)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad = False
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


class MobileNetV2(Backbone):
    """Returns ``{name: (N, C, H/stride, W/stride)}`` for the requested ``out_features``."""

    def __init__(self, in_channels: int, out_features, norm: str = "FrozenBN", width_mult: float = 1.0, freeze_at: int = 0):
        super().__init__()
        bad = [f for f in out_features if f not in STAGE_NAMES]
        if bad:
            raise ConfigError(
                f"unknown MODEL.MOBILENETV2.OUT_FEATURES {bad}. Valid choices: {', '.join(STAGE_NAMES)}"
            )
        self._out_features = list(out_features)
        cin = _divisible(32 * width_mult)
        layers = [nn.Sequential(*_conv_norm(in_channels, cin, 3, 2, norm))]
        if freeze_at >= 1:
            layers[0] = _freeze(layers[0])
        self._stage_of_layer = [""]
        self._out_feature_channels, self._out_feature_strides = {}, {}
        stride, stage = 2, 2
        for t, c, n, s, name in _SETTINGS:
            cout = _divisible(c * width_mult)
            stride *= s
            for i in range(n):
                block = InvertedResidual(cin, cout, s if i == 0 else 1, t, norm)
                if stage <= freeze_at:
                    block = _freeze(block)
                layers.append(block)
                last = name != "" and i == n - 1
                self._stage_of_layer.append(name if last else "")
                if last:
                    self._out_feature_channels[name] = cout
                    self._out_feature_strides[name] = stride
                    stage += 1
                cin = cout
        self.features = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = {}
        for layer, name in zip(self.features, self._stage_of_layer):
            x = layer(x)
            if name in self._out_features:
                out[name] = x
        return out

    def output_shape(self):
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_backbone(cfg, input_shape: ShapeSpec):
    m = cfg.MODEL.MOBILENETV2
    return MobileNetV2(
        input_shape.channels, m.OUT_FEATURES, m.NORM, m.get("WIDTH_MULT", 1.0), cfg.MODEL.BACKBONE.FREEZE_AT
    )


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV2 + FPN (``MODEL.FPN.*``) with a max-pooled p6."""
    bottom_up = build_mobilenetv2_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
