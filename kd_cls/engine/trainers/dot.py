"""Trainers ``dot`` and ``crd_dot``: the base and CRD trainers optimised with :class:`kd_cls.optim.DOT`.

Each step back-propagates the distillation loss and the task loss separately,
so DOT can keep one momentum buffer for each (``SOLVER.MOMENTUM -
SOLVER.DOT.DELTA`` for the task, ``SOLVER.MOMENTUM + SOLVER.DOT.DELTA`` for the
distillation). Any distiller whose loss dict has ``loss_ce`` and ``loss_kd``
works; further entries, if any, count as distillation losses.

Under ``torchrun`` the two backward passes of one forward cannot both go
through DistributedDataParallel's reducer, so the step runs under ``no_sync()``
and each pass's gradients are averaged over the processes explicitly.
"""
from __future__ import annotations

from typing import Dict

import torch

from kd_cls.config import ConfigError
from kd_cls.optim import DOT

from ..distributed import world_size
from .base import TRAINERS, BaseTrainer, CRDTrainer

__all__ = ["DOTTrainer", "CRDDOTTrainer", "split_losses"]


def split_losses(losses: Dict[str, torch.Tensor]):
    """``(task_loss, distillation_loss)`` scalars from a distiller's loss dict."""
    missing = [k for k in ("loss_ce", "loss_kd") if k not in losses]
    if missing:
        raise ConfigError(
            f"SOLVER.TRAINER dot/crd_dot needs a distiller whose losses include loss_ce and loss_kd; "
            f"got {', '.join(sorted(losses)) or 'none'} (missing {', '.join(missing)}); use SOLVER.TRAINER base"
        )
    loss_ce = losses["loss_ce"].mean()
    loss_kd = sum(v.mean() for k, v in losses.items() if k != "loss_ce")
    return loss_ce, loss_kd


class _DOTMixin:
    def build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.SOLVER.TYPE != "SGD":
            raise ConfigError(f"unknown SOLVER.TYPE {cfg.SOLVER.TYPE!r} for DOT. Valid choices: SGD")
        if str(cfg.SOLVER.AMP) == "fp16":
            raise ConfigError("SOLVER.AMP fp16 needs loss scaling, which DOT's two backward passes do not "
                              "support; use SOLVER.AMP bf16 or ''")
        delta = float(cfg.SOLVER.DOT.DELTA)
        momentum = float(cfg.SOLVER.MOMENTUM)
        if delta < 0 or momentum - delta < 0:
            raise ConfigError(f"SOLVER.DOT.DELTA {delta} must be in [0, SOLVER.MOMENTUM={momentum}]")
        return DOT(
            self.distiller.get_learnable_parameters(),
            lr=cfg.SOLVER.LR,
            momentum=momentum - delta,
            momentum_kd=momentum + delta,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )

    def train_step(self, batch, epoch: int):
        if self.model is self.distiller:
            return super().train_step(batch, epoch)
        with self.model.no_sync():
            return super().train_step(batch, epoch)

    def _average_grads(self) -> None:
        n = world_size()
        if self.model is self.distiller or n <= 1:
            return
        import torch.distributed as dist

        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(n)

    def optimize(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        loss_ce, loss_kd = split_losses(losses)
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if loss_kd.requires_grad:
            loss_kd.backward(retain_graph=True)
            self._average_grads()
        opt.step_kd()
        opt.zero_grad(set_to_none=True)
        loss_ce.backward()
        self._average_grads()
        opt.step()
        return (loss_ce + loss_kd).detach()


@TRAINERS.register("dot")
class DOTTrainer(_DOTMixin, BaseTrainer):
    """mdistiller's ``DOT`` trainer."""


@TRAINERS.register("crd_dot")
class CRDDOTTrainer(_DOTMixin, CRDTrainer):
    """mdistiller's ``CRDDOT`` trainer; ``epoch=`` reaches the distiller, as under every trainer here."""
