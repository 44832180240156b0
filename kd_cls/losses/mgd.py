"""MGD: masked generative distillation (detection variant).

Paper: Yang et al., "Masked Generative Distillation", ECCV 2022,
arXiv 2205.01529.

Reference implementation matched here: the detection ``FeatureLoss`` from
yzd-v/MGD, commit 2c9da0b28625eb948db57afc02c824452c3910fe, file
``det/mmdet/distillation/losses/mgd.py``. Parameter names, shapes and
(PyTorch default) initialisation are the official ones.

A random spatial mask, shared by all channels, zeroes about ``lambda_`` of the
(aligned) student's positions; a two-layer 3x3 conv generator must rebuild the
full teacher map from what is left. The loss is the summed squared error of
that rebuild divided by the batch size, times ``alpha``.

The mask is drawn exactly as officially: ``torch.rand((N, 1, H, W))`` from the
default CPU generator, then moved to the features' device, so under one
``torch.manual_seed`` this loss and the official one agree bit for bit on CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MGDLoss"]


class MGDLoss(nn.Module):
    """MGD feature loss for one FPN level.

    Args:
        student_channels: channels of the student map.
        teacher_channels: channels of the teacher map; a 1x1 ``align`` conv
            maps the student to them when the two differ.
        alpha: weight of the loss.
        lambda_: expected fraction of masked (zeroed) positions.
    """

    def __init__(self, student_channels: int, teacher_channels: int, alpha: float = 2e-5, lambda_: float = 0.65):
        super().__init__()
        self.alpha = alpha
        self.lambda_ = lambda_
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.align = None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Scalar MGD loss.

        Args:
            student: ``(N, C_s, H, W)`` student feature map.
            teacher: ``(N, C_t, H, W)`` teacher feature map.

        Draws one ``(N, 1, H, W)`` uniform tensor from the default CPU
        generator per call; a position is kept where the draw is at most
        ``1 - lambda_``.
        """
        if student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(
                f"MGDLoss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in size"
            )
        if self.align is not None:
            student = self.align(student)
        n, _, h, w = teacher.shape
        draw = torch.rand((n, 1, h, w)).to(student.device)
        keep = (draw <= 1 - self.lambda_).to(student.dtype)
        rebuilt = self.generation(student * keep)
        return F.mse_loss(rebuilt, teacher, reduction="sum") / n * self.alpha
