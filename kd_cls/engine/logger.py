"""Run logging: ``worklog.txt`` (mdistiller's format), TensorBoard scalars, optional W&B.

Only the main process writes. W&B is off by default (``LOG.WANDB``); when it
is on and fails (not installed, no login, network), the run warns and goes on
without it.

After ``--resume``, :meth:`RunLogger.resume_at` makes the logs hold exactly the
epochs of the ``latest`` checkpoint: the worklog keeps its blocks up to that
epoch (the block of that epoch is written from the checkpoint if a kill lost
it), and TensorBoard purges what a killed run logged past it.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Mapping, Optional

from kd_cls.checkpoint_io import atomic_write_text

__all__ = ["RunLogger", "log_msg", "epoch_block", "truncate_worklog"]

_COLORS = {"INFO": 36, "TRAIN": 32, "EVAL": 31, "WARN": 33}
_RULE = "-" * 25
_EPOCH_LINE = re.compile(r"^epoch: (\d+)$")


def log_msg(msg: str, mode: str = "INFO") -> str:
    """``[MODE] msg``, coloured when stdout is a terminal."""
    text = f"[{mode}] {msg}"
    if sys.stdout.isatty():
        return f"\033[{_COLORS.get(mode, 0)}m{text}\033[0m"
    return text


def epoch_block(epoch: int, lr: float, values: Mapping[str, float]) -> str:
    """One epoch's block of ``worklog.txt``, as mdistiller writes it."""
    lines = [_RULE, f"epoch: {epoch}", f"lr: {lr:.4g}"] + [f"{k}: {v:.2f}" for k, v in values.items()]
    return "\n".join(lines + [_RULE]) + "\n"


def truncate_worklog(text: str, last_epoch: int) -> str:
    """The worklog with the blocks of epochs ``<= last_epoch`` only, and without ``best_acc`` lines.

    Lines before the first block (``teacher_acc``) stay.
    """
    out, block = [], None
    for line in text.splitlines():
        if block is None:
            if line == _RULE:
                block = [line]
            elif not line.startswith("best_acc"):
                out.append(line)
            continue
        block.append(line)
        if line == _RULE and len(block) > 1:
            m = next((_EPOCH_LINE.match(b) for b in block if _EPOCH_LINE.match(b)), None)
            if m is not None and int(m.group(1)) <= last_epoch:
                out.extend(block)
            block = None
    return "\n".join(out) + ("\n" if out else "")


class RunLogger:
    def __init__(self, log_path: str, cfg, experiment_name: str, enabled: bool = True):
        self.log_path = log_path
        self.cfg = cfg
        self.enabled = enabled
        self._tb = None
        self._tb_steps = None
        self._purge_epoch: Optional[int] = None
        self._purge_step: Optional[int] = None
        self._wandb = None
        if enabled and cfg.LOG.WANDB:
            self._init_wandb(experiment_name)

    @property
    def worklog(self) -> str:
        return os.path.join(self.log_path, "worklog.txt")

    # ---- text
    def info(self, msg: str, mode: str = "INFO") -> None:
        if self.enabled:
            print(log_msg(msg, mode), flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            with open(self.worklog, "a") as f:
                f.write(text)

    def epoch(self, epoch: int, lr: float, values: Mapping[str, float]) -> None:
        """Append one epoch's block to ``worklog.txt`` and its scalars to TensorBoard and W&B."""
        if not self.enabled:
            return
        self.write(epoch_block(epoch, lr, values))
        tb = self.tensorboard()
        if tb is not None:
            tb.add_scalar("lr", lr, epoch)
            for k, v in values.items():
                tb.add_scalar(k, v, epoch)
            tb.flush()
        self.wandb_log({"current lr": lr, **values})

    def resume_at(self, epoch: int, global_step: int, last_log: Optional[Mapping[str, float]] = None) -> None:
        """Make the logs hold exactly epochs ``1..epoch`` (see the module docstring)."""
        self._purge_epoch, self._purge_step = epoch + 1, global_step + 1
        if not self.enabled or not os.path.isfile(self.worklog):
            return
        with open(self.worklog) as f:
            text = truncate_worklog(f.read(), epoch)
        if last_log and f"epoch: {epoch}\n" not in text:
            values = dict(last_log)
            lr = float(values.pop("lr", 0.0))
            text += epoch_block(epoch, lr, values)
        atomic_write_text(self.worklog, text)

    def scalar(self, name: str, value: float, step: int) -> None:
        """A per-step scalar, in its own event folder (``train.events/steps``), whose steps are not epochs."""
        if not self.enabled:
            return
        if self._tb_steps is None:
            self._tb_steps = self._writer(os.path.join(self.log_path, "train.events", "steps"), self._purge_step)
        if self._tb_steps:
            self._tb_steps.add_scalar(name, value, step)

    # ---- TensorBoard
    def _writer(self, path: str, purge_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(path, purge_step=purge_step)
        except Exception as e:  # a missing tensorboard must not stop training
            warnings.warn(f"TensorBoard logging is off: {e}")
            return False

    def tensorboard(self):
        if not self.enabled:
            return None
        if self._tb is None:
            self._tb = self._writer(os.path.join(self.log_path, "train.events"), self._purge_epoch)
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
        for w in (self._tb, self._tb_steps):
            if w:
                w.close()
        self._tb = self._tb_steps = None
