"""Run logging: ``worklog.txt`` (mdistiller's format), TensorBoard scalars, optional W&B.

Only the main process writes. W&B is off by default (``LOG.WANDB``); when it
is on and fails (not installed, no login, network), the run warns and goes on
without it.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Mapping, Optional

__all__ = ["RunLogger", "log_msg"]

_COLORS = {"INFO": 36, "TRAIN": 32, "EVAL": 31, "WARN": 33}


def log_msg(msg: str, mode: str = "INFO") -> str:
    """``[MODE] msg``, coloured when stdout is a terminal."""
    text = f"[{mode}] {msg}"
    if sys.stdout.isatty():
        return f"\033[{_COLORS.get(mode, 0)}m{text}\033[0m"
    return text


class RunLogger:
    def __init__(self, log_path: str, cfg, experiment_name: str, enabled: bool = True):
        self.log_path = log_path
        self.cfg = cfg
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if enabled and cfg.LOG.WANDB:
            self._init_wandb(experiment_name)

    # ---- text
    def info(self, msg: str, mode: str = "INFO") -> None:
        if self.enabled:
            print(log_msg(msg, mode), flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            with open(os.path.join(self.log_path, "worklog.txt"), "a") as f:
                f.write(text)

    def epoch(self, epoch: int, lr: float, values: Mapping[str, float]) -> None:
        """Append one epoch's block to ``worklog.txt`` and its scalars to TensorBoard and W&B."""
        if not self.enabled:
            return
        lines = ["-" * 25, f"epoch: {epoch}", f"lr: {lr:.4g}"] + [f"{k}: {v:.2f}" for k, v in values.items()]
        self.write("\n".join(lines + ["-" * 25]) + "\n")
        tb = self.tensorboard()
        if tb is not None:
            tb.add_scalar("lr", lr, epoch)
            for k, v in values.items():
                tb.add_scalar(k, v, epoch)
            tb.flush()
        self.wandb_log({"current lr": lr, **values})

    def scalar(self, name: str, value: float, step: int) -> None:
        tb = self.tensorboard()
        if tb is not None:
            tb.add_scalar(name, value, step)

    # ---- TensorBoard
    def tensorboard(self):
        if not self.enabled:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.log_path, "train.events"))
            except Exception as e:  # a missing tensorboard must not stop training
                warnings.warn(f"TensorBoard logging is off: {e}")
                self._tb = False
        return self._tb or None

    # ---- W&B
    def _init_wandb(self, name: str) -> None:
        try:
            import wandb

            tags = self.cfg.EXPERIMENT.TAG.split(",")
            wandb.init(project=self.cfg.EXPERIMENT.PROJECT, name=name, tags=tags)
            self._wandb = wandb
        except Exception as e:
            warnings.warn(f"W&B logging is off: {type(e).__name__}: {e}")
            self._wandb = None

    def wandb_log(self, values: Mapping[str, float], summary: Optional[Mapping[str, float]] = None) -> None:
        if self._wandb is None:
            return
        try:
            self._wandb.log(dict(values))
            for k, v in (summary or {}).items():
                self._wandb.run.summary[k] = v
        except Exception as e:
            warnings.warn(f"W&B logging stopped: {type(e).__name__}: {e}")
            self._wandb = None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        self._tb = None
