"""DOT, the distillation-oriented trainer (Zhao et al., ICCV 2023, arXiv 2307.08436).

SGD with two momentum buffers per parameter: one accumulates the gradients of
the task loss (cross-entropy), the other those of the distillation loss. The
distillation buffer gets the larger momentum, so that the optimisation follows
the teacher's direction more steadily. One iteration::

    opt.zero_grad()
    loss_kd.backward(retain_graph=True)
    opt.step_kd()          # stores the distillation gradients
    opt.zero_grad()
    loss_ce.backward()
    opt.step()             # updates both buffers, then the parameters

For a parameter ``p`` with task gradient ``g`` and distillation gradient ``h``
(learning rate ``lr``, weight decay ``wd``, momenta ``m`` and ``m_kd``)::

    v    = m    * v    + (g + wd * p)       # task buffer
    v_kd = m_kd * v_kd + h                  # distillation buffer
    p   -= lr * (v + v_kd)

A buffer starts as its first gradient (no momentum term), as in ``torch.optim.SGD``.
A parameter that gets only one of the two gradients in a step (a connector that
only the distillation loss reaches, a classifier that only cross-entropy reaches)
updates that buffer with the mean momentum ``(m + m_kd) / 2``; for such a
distillation-only parameter the weight decay is added to ``h`` instead (except
on the step that creates its buffer, as in the official implementation).

Both ``step_kd`` and ``step`` consume the gradients: they set ``p.grad`` to None
after reading it. Which parameters took part in which backward pass is then
known whatever ``zero_grad(set_to_none=...)`` the caller uses.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.optim.optimizer import Optimizer

from kd_cls.config import CfgNode

__all__ = ["DOT", "add_dot_config"]


def add_dot_config(cfg: CfgNode) -> None:
    """``SOLVER.DOT``: the trainers ``dot``/``crd_dot`` read it."""
    cfg.SOLVER.DOT = CfgNode()
    # The trainer uses momenta MOMENTUM - DELTA (task) and MOMENTUM + DELTA (distillation).
    cfg.SOLVER.DOT.DELTA = 0.075


class DOT(Optimizer):
    """Distillation-oriented SGD with separate task and distillation momenta.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum of the task-loss buffer (``state["momentum_buffer"]``).
        momentum_kd: momentum of the distillation-loss buffer (``state["momentum_kd_buffer"]``).
        weight_decay: L2 penalty, added to the task gradient (see the module docstring).
        dampening: kept for parity with SGD and mdistiller's optimizer state; 0 by default.

    The buffer names match mdistiller's ``DistillationOrientedTrainer``, so its
    optimizer states load here.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, momentum_kd: float = 0.0,
                 weight_decay: float = 0.0, dampening: float = 0.0):
        for name, value in (("lr", lr), ("momentum", momentum), ("momentum_kd", momentum_kd),
                            ("weight_decay", weight_decay)):
            if value < 0.0:
                raise ValueError(f"DOT: {name} must be >= 0, got {value}")
        defaults = dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        # Distillation gradients between step_kd() and step(); not part of the state.
        self._kd_grads: Dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step_kd(self, closure=None):
        """Store the current gradients as the distillation-loss gradients.

        Call it after ``loss_kd.backward()``. The parameters are not changed yet.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._kd_grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._kd_grads[p] = p.grad.detach().clone()
                    p.grad = None
        return loss

    @torch.no_grad()
    def step(self, closure=None):
        """Read the task-loss gradients, update both buffers and the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kd_grads, self._kd_grads = self._kd_grads, {}
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            m, m_kd = group["momentum"], group["momentum_kd"]
            m_mean = (m + m_kd) / 2.0
            damp = 1.0 - group["dampening"]
            for p in group["params"]:
                g = p.grad
                h = kd_grads.get(p)
                if g is None and h is None:
                    continue
                state = self.state[p]
                update: Optional[torch.Tensor] = None
                if g is not None:
                    d_p = g.add(p, alpha=wd) if wd != 0 else g.clone()
                    if m != 0:
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = d_p.detach().clone()
                            state["momentum_buffer"] = buf
                        else:
                            buf.mul_(m if h is not None else m_mean).add_(d_p, alpha=damp)
                        d_p = buf
                    update = d_p
                    p.grad = None
                if h is not None:
                    buf = state.get("momentum_kd_buffer")
                    if buf is None:
                        buf = h.clone()
                        state["momentum_kd_buffer"] = buf
                    elif g is not None:
                        buf.mul_(m_kd).add_(h, alpha=damp)
                    else:
                        d_h = h.add(p, alpha=wd) if wd != 0 else h
                        buf.mul_(m_mean).add_(d_h, alpha=damp)
                    # Task then distillation step, as two in-place updates.
                    if update is not None:
                        p.add_(update, alpha=-lr)
                    p.add_(buf, alpha=-lr)
                elif update is not None:
                    p.add_(update, alpha=-lr)
        return loss
