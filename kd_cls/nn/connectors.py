"""Connectors: the small learnable modules that map a student's features onto a teacher's.

Shared by both frontends (kd_det's ReviewKD runs the same ``ABF``):

* :class:`ABF`: ReviewKD's attention-based fusion (Chen et al., CVPR 2021);
* :class:`ConvReg`: FitNet's regressor to the teacher's shape (Romero et al., 2015);
* :class:`Embed`: CRD's linear embedding onto the unit sphere (Tian et al., ICLR 2020);
* :class:`ChannelAlign`: a 1x1 convolution from student to teacher channels, or
  the identity when they are equal (the ``align`` rule of FGD, MGD and the
  detection FitNet).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ABF", "ConvReg", "Embed", "ChannelAlign", "conv1x1"]


def conv1x1(c_in: int, c_out: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)


class ChannelAlign(nn.Module):
    """``(N, Cs, H, W)`` -> ``(N, Ct, H, W)``: a 1x1 conv with bias when ``Cs != Ct``, else the identity.

    As the official FGD/MGD ``align`` layers: present (and in the state dict)
    only when the channel counts differ.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.align = conv1x1(student_channels, teacher_channels, bias=True) if student_channels != teacher_channels \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.align(x) if self.align is not None else x


class ABF(nn.Module):
    """Attention-based fusion.

    ``x``: ``(N, in_channel, h, w)`` student feature; ``y``: ``(N, mid, h', w')``
    the deeper ABF's fused map (``None`` for the first, deepest one), upsampled
    (nearest) to ``shape x shape``, or to ``(h, w)`` when ``shape`` is ``None``
    (the detection frontend's non-square FPN levels).
    Returns ``(out, fused)``: ``out`` is ``(N, out_channel, out_shape, out_shape)``
    (``(h, w)`` when ``out_shape`` is ``None``), ``fused`` is the ``(N, mid, ., .)``
    map handed to the next ABF.
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape: Optional[int] = None, out_shape: Optional[int] = None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            if y is None:
                raise ValueError("ABF with fusion needs the deeper feature y")
            y = F.interpolate(y, (shape, shape) if shape is not None else (h, w), mode="nearest")
            att = self.att_conv(torch.cat([x, y], dim=1))
            x = x * att[:, 0].view(n, 1, h, w) + y * att[:, 1].view(n, 1, h, w)
        if out_shape is not None and x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


class ConvReg(nn.Module):
    """FitNet's regressor: student map ``(N, Cs, Hs, Ws)`` -> teacher shape ``(N, Ct, Ht, Wt)``.

    Conv 3x3 stride 2 when ``Hs == 2 Ht``; transposed conv 4x4 stride 2 when
    ``2 Hs == Ht``; otherwise a conv of kernel ``(1 + Hs - Ht, 1 + Ws - Wt)``
    (needs ``Hs >= Ht``). Then BN and, with ``use_relu``, ReLU.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"no regressor from student map {s_h}x{s_w} to teacher map {t_h}x{t_w}; "
                "the student map must be at least the teacher's size, or half of it"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class Embed(nn.Module):
    """``(N, ...)`` features -> ``(N, dim_out)`` unit vectors."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()
