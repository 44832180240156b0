"""Accuracy, running averages, evaluation and mdistiller's step learning-rate schedule."""
from __future__ import annotations

import contextlib
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .distributed import all_reduce_sum, is_main

__all__ = ["AverageMeter", "accuracy", "correct_topk", "validate", "lr_at_epoch", "adjust_learning_rate"]


class AverageMeter:
    """Weighted running average (``update(value, n)``)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = self.sum = self.avg = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1):
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count


def correct_topk(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, per k: a float tensor ``(len(topk),)``.

    ``k`` is capped at the number of classes.
    """
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1, largest=True, sorted=True).indices  # (N, maxk)
    hit = pred.eq(target.reshape(-1, 1))
    return torch.stack([hit[:, : min(k, maxk)].any(1).float().sum() for k in topk])


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)):
    """Top-k accuracies in percent, one tensor per k (mdistiller's ``accuracy``)."""
    with torch.no_grad():
        c = correct_topk(logits, target, topk) * (100.0 / target.shape[0])
    return [c[i : i + 1] for i in range(len(topk))]


@torch.no_grad()
def validate(loader, model: nn.Module, device: torch.device, autocast=None, desc: str = "eval") -> Tuple[float, float, float]:
    """``(top1 %, top5 %, mean cross-entropy)`` of ``model(x)`` in eval mode over ``loader``.

    ``model`` is a classifier or a ``Distiller`` (whose eval forward is the student's).

    Under ``torch.distributed`` each process evaluates its shard of the
    loader and the counts are summed, so the result is that of the whole set.
    """
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, n
    ctx = autocast or contextlib.nullcontext
    with tqdm(total=len(loader), desc=desc, leave=False, disable=not is_main(), mininterval=1.0) as pbar:
        for batch in loader:
            image, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with ctx():
                logits = model(image)
            logits = logits.float()
            loss = F.cross_entropy(logits, target, reduction="sum")
            c = correct_topk(logits, target, (1, 5))
            stats += torch.stack([c[0].double(), c[1].double(), loss.double(), torch.tensor(float(target.shape[0]), dtype=torch.float64, device=device)])
            pbar.update()
    all_reduce_sum(stats)
    model.train(was_training)
    n = max(stats[3].item(), 1.0)
    return 100.0 * stats[0].item() / n, 100.0 * stats[1].item() / n, stats[2].item() / n


def lr_at_epoch(epoch: int, cfg) -> float:
    """mdistiller's step schedule: ``LR * LR_DECAY_RATE ** (number of stages < epoch)`` (epochs count from 1)."""
    steps = sum(1 for s in cfg.SOLVER.LR_DECAY_STAGES if epoch > s)
    return cfg.SOLVER.LR * (cfg.SOLVER.LR_DECAY_RATE**steps)


def adjust_learning_rate(epoch: int, cfg, optimizer: torch.optim.Optimizer) -> float:
    lr = lr_at_epoch(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
