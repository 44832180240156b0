"""FGD: focal and global knowledge distillation for detectors.

Paper: Yang et al., "Focal and Global Knowledge Distillation for Detectors",
CVPR 2022, arXiv 2111.11837.

Reference implementation matched here: ``FeatureLoss`` from yzd-v/FGD, commit
c03a6cf3b3cb3cbfd5554dbf4766e7135747d22d, file
``mmdet/distillation/losses/fgd.py``. Parameter names, shapes and
initialisation are the official ones, so state dicts move between the two
modules with ``strict=True``; under one ``torch.manual_seed`` both draw the
same initial weights.

For one FPN level the loss is

``alpha * L_fg + beta * L_bg + gamma * L_att + lambda_ * L_global``

* ``L_fg``, ``L_bg``: squared student-teacher differences weighted by the
  teacher's spatial and channel attention and by the foreground / background
  masks, summed and divided by the batch size;
* ``L_att``: L1 distance of the student's and teacher's attentions (channel
  and spatial), per image;
* ``L_global``: squared difference of the two maps after each is added to its
  own GCNet-style global-context vector, per image.

Masks, built from the ground-truth boxes scaled to the feature grid with the
box's left/top edge floored and right/bottom edge ceiled (both ends
inclusive): a foreground cell holds ``1 / (box cells)`` of the smallest box
covering it (box cells counted before clipping to the grid, so a box reaching
the border counts one row/column past it); background cells share a total
weight of one (all zero when boxes cover the whole map). Boxes are handled
all at once per image; the official code loops over them.

Known difference: a box whose scaled left or top edge floors below zero is
clipped to the grid here, whereas the official Python slicing with a negative
start wraps around (usually dropping the box from the mask). Ground-truth boxes
inside the image, as mmdet's pipelines produce, never hit this.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FGDLoss"]


def _context_transform(channels: int) -> nn.Sequential:
    """GCNet bottleneck ``C -> C//2 -> C`` acting on ``(N, C, 1, 1)`` vectors."""
    return nn.Sequential(
        nn.Conv2d(channels, channels // 2, kernel_size=1),
        nn.LayerNorm([channels // 2, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels // 2, channels, kernel_size=1),
    )


def _box_masks(
    gt_boxes: Sequence[torch.Tensor],
    image_sizes: Sequence,
    height: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background weight maps, each ``(N, height, width)``.

    ``gt_boxes[i]``: ``(n_i, 4)`` xyxy boxes in input pixels (``n_i`` may be 0);
    ``image_sizes[i]``: ``(h, w, ...)`` of the image those pixels refer to.
    Per image, all boxes are tested against the grid at once.
    """
    fg = torch.zeros(len(gt_boxes), height, width, dtype=dtype, device=device)
    bg = torch.ones(len(gt_boxes), height, width, dtype=dtype, device=device)
    row_ids = torch.arange(height, device=device).view(1, height, 1)
    col_ids = torch.arange(width, device=device).view(1, 1, width)
    for i, (boxes, size) in enumerate(zip(gt_boxes, image_sizes)):
        boxes = boxes.to(device)
        if boxes.shape[0] > 0:
            img_h, img_w = size[0], size[1]
            left = torch.floor(boxes[:, 0] / img_w * width).int().view(-1, 1, 1)
            right = torch.ceil(boxes[:, 2] / img_w * width).int().view(-1, 1, 1)
            top = torch.floor(boxes[:, 1] / img_h * height).int().view(-1, 1, 1)
            bottom = torch.ceil(boxes[:, 3] / img_h * height).int().view(-1, 1, 1)
            per_cell = 1.0 / (bottom + 1 - top) / (right + 1 - left)
            covered = (row_ids >= top) & (row_ids <= bottom) & (col_ids >= left) & (col_ids <= right)
            # (n_i, H, W): each box's per-cell weight where it lies, 0 elsewhere;
            # the largest weight (smallest box) wins on overlaps.
            fg[i] = torch.where(covered, per_cell, torch.zeros_like(per_cell)).amax(dim=0).to(dtype)
        free = (fg[i] <= 0).to(dtype)
        # an all-foreground map keeps an all-zero background (the clamp only avoids 0/0)
        bg[i] = free / free.sum().clamp_min(1)
    return fg, bg


class FGDLoss(nn.Module):
    """FGD feature loss for one FPN level.

    Args:
        student_channels: channels of the student map.
        teacher_channels: channels of the teacher map; a 1x1 ``align`` conv
            maps the student to them when the two differ.
        temp: temperature of the attention softmaxes.
        alpha, beta, gamma, lambda_: weights of the foreground, background,
            attention and global (relation) terms.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temp: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 1e-3,
        lambda_: float = 5e-6,
    ):
        super().__init__()
        self.temp = temp
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.lambda_ = lambda_
        # creation order follows the official module so seeded inits agree
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.align = None
        self.conv_mask_s = nn.Conv2d(teacher_channels, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(teacher_channels, 1, kernel_size=1)
        self.channel_add_conv_s = _context_transform(teacher_channels)
        self.channel_add_conv_t = _context_transform(teacher_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal (fan-in) attention-pooling convs with zero bias; the last
        conv of each context transform starts at zero (weights and bias)."""
        for conv in (self.conv_mask_s, self.conv_mask_t):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for branch in (self.channel_add_conv_s, self.channel_add_conv_t):
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)

    def _attention(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N, C, H, W)`` -> spatial ``(N, H, W)`` (mean ``1``) and channel
        ``(N, C)`` (mean ``1``) attention from the absolute activations."""
        n, c, h, w = feat.shape
        magnitude = feat.abs()
        spatial = F.softmax(magnitude.mean(dim=1).reshape(n, -1) / self.temp, dim=1)
        channel = F.softmax(magnitude.mean(dim=(2, 3)) / self.temp, dim=1)
        return (h * w) * spatial.reshape(n, h, w), c * channel

    def _global_context(self, feat: torch.Tensor, mask_conv: nn.Conv2d) -> torch.Tensor:
        """Attention-pooled context: ``(N, C, H, W)`` -> ``(N, C, 1, 1)``."""
        n, c, h, w = feat.shape
        pool = F.softmax(mask_conv(feat).reshape(n, h * w, 1), dim=1)
        return torch.bmm(feat.reshape(n, c, h * w), pool).reshape(n, c, 1, 1)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        gt_boxes: Sequence[torch.Tensor],
        image_sizes: Sequence,
    ) -> torch.Tensor:
        """Total FGD loss (scalar) of one level.

        Args:
            student: ``(N, C_s, H, W)`` student feature map.
            teacher: ``(N, C_t, H, W)`` teacher feature map.
            gt_boxes: ``N`` tensors ``(n_i, 4)``, xyxy boxes in input pixels;
                ``n_i = 0`` is allowed (background-only image).
            image_sizes: ``N`` pairs ``(h, w)`` (extra trailing entries such as
                channels are ignored): the size the box coordinates refer to,
                i.e. the official ``img_metas[i]['img_shape']``.
        """
        if student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(
                f"FGDLoss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in size"
            )
        if len(gt_boxes) != student.shape[0] or len(image_sizes) != student.shape[0]:
            raise ValueError(
                f"FGDLoss: {student.shape[0]} images but {len(gt_boxes)} box sets and {len(image_sizes)} sizes"
            )
        if self.align is not None:
            student = self.align(student)
        n, _, h, w = student.shape

        spatial_t, channel_t = self._attention(teacher)
        spatial_s, channel_s = self._attention(student)
        fg, bg = _box_masks(gt_boxes, image_sizes, h, w, student.dtype, student.device)

        # focal part: teacher attention reweights the squared differences
        sq_diff = (student - teacher).pow(2) * spatial_t.unsqueeze(1) * channel_t[:, :, None, None]
        fg_loss = (sq_diff * fg.unsqueeze(1)).sum() / n
        bg_loss = (sq_diff * bg.unsqueeze(1)).sum() / n
        att_loss = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n

        # global part: each map plus its transformed context vector
        glob_s = student + self.channel_add_conv_s(self._global_context(student, self.conv_mask_s))
        glob_t = teacher + self.channel_add_conv_t(self._global_context(teacher, self.conv_mask_t))
        global_loss = F.mse_loss(glob_s, glob_t, reduction="sum") / n

        return (
            self.alpha * fg_loss
            + self.beta * bg_loss
            + self.gamma * att_loss
            + self.lambda_ * global_loss
        )
