"""The classification trainer (mdistiller's ``BaseTrainer``), and its registry.

``SOLVER.TRAINER`` names a class of ``TRAINERS``: ``base`` and ``crd`` here,
``dot`` and ``crd_dot`` in :mod:`.dot`. A subclass changes the optimisation by
overriding only

* ``build_optimizer() -> torch.optim.Optimizer`` (default: SGD with momentum
  and weight decay over ``distiller.get_learnable_parameters()``), and
* ``optimize(losses) -> Tensor`` (default: zero the gradients, back-propagate
  ``sum(l.mean())``, step; returns that total).

Batches are ``(image, target)``, ``(image, target, index)`` or ``(image,
target, index, contrastive_index)``, or named tuples (``ViewBatch``: ``image,
target, index, view``) whose extras pass by their names; the distiller is
called as ``distiller(image=, target=, epoch=, [index=, contrastive_index=, view=])``.
Everything around the step (evaluation, checkpoints, logging, the NaN guard)
is a hook (:mod:`kd_cls.engine.hooks`).
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from kd_cls.checkpoint_io import atomic_write_text, remove_stale_temp_files
from kd_cls.config import ConfigError
from kd_cls.registry import Registry

from .. import checkpoint as run_ckpt
from ..distributed import barrier, is_distributed, is_main, rank, training_device
from ..hooks import CheckpointHook, EvalHook, LogWriter, LossGuard, ProgressBar, TeacherEval
from ..logger import RunLogger
from ..metrics import adjust_learning_rate, correct_topk
from ..train_loop import HookBase, TrainLoop

__all__ = ["TRAINERS", "BaseTrainer", "CRDTrainer", "get_trainer", "seed_everything", "AMP_DTYPES"]

TRAINERS = Registry("trainer")
AMP_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_trainer(name: str):
    """The trainer class registered as ``name`` (unknown names list the valid ones)."""
    return TRAINERS.get(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@TRAINERS.register("base")
class BaseTrainer(TrainLoop):
    """Train ``distiller`` on ``train_loader``, evaluate on ``val_loader`` every epoch.

    Writes to ``LOG.PREFIX/experiment_name``: ``cfg.yaml``, ``worklog.txt``,
    ``train.events`` (TensorBoard) and the checkpoints of
    :mod:`kd_cls.engine.checkpoint`.
    """

    def __init__(self, experiment_name: str, distiller: nn.Module, train_loader, val_loader, cfg):
        super().__init__()
        if isinstance(distiller, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            distiller = distiller.module
        self.cfg = cfg
        self.experiment_name = experiment_name
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = training_device()
        amp = str(cfg.SOLVER.AMP)
        if amp not in AMP_DTYPES:
            raise ConfigError(f"unknown SOLVER.AMP {amp!r}. Valid choices: '' (off), bf16, fp16")
        self.amp_dtype = AMP_DTYPES[amp]
        self.channels_last = bool(cfg.SOLVER.CHANNELS_LAST)
        self.distiller = distiller.to(self.device)
        if self.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        if cfg.SOLVER.COMPILE:
            self.distiller.student.compile()
        self.model = self._wrap_ddp(self.distiller)
        self.optimizer = self.build_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.best_acc = -1.0
        self.global_step = 0
        self.max_epoch = int(cfg.SOLVER.EPOCHS)
        self.sync_every = 1 if self.device.type == "cpu" else 20
        self.log_path = os.path.join(cfg.LOG.PREFIX, experiment_name)
        if is_main():
            os.makedirs(self.log_path, exist_ok=True)
        self.logger = RunLogger(self.log_path, cfg, experiment_name, enabled=is_main())
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> List[HookBase]:
        return [TeacherEval(), LossGuard(), ProgressBar(), EvalHook(), CheckpointHook(), LogWriter()]

    # ------------------------------------------------------------------ for subclasses
    def build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.SOLVER.TYPE != "SGD":
            raise ConfigError(f"unknown SOLVER.TYPE {cfg.SOLVER.TYPE!r}. Valid choices: SGD")
        return torch.optim.SGD(
            self.distiller.get_learnable_parameters(),
            lr=cfg.SOLVER.LR,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )

    def optimize(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on ``sum(l.mean())``; returns that total (with its graph)."""
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(l.mean() for l in losses.values())
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        return total

    # ------------------------------------------------------------------ one step
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _wrap_ddp(self, distiller: nn.Module) -> nn.Module:
        if not is_distributed():
            return distiller
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # CPU convolutions may return 1x1-kernel gradients in another stride order; DDP copies them, correctly.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        find_unused = bool(getattr(distiller, "ddp_find_unused_parameters", False))
        return DDP(distiller, device_ids=ids, find_unused_parameters=find_unused)

    def unpack(self, batch) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        """``(image, target, extra kwargs)`` on the training device."""
        image, target = batch[0], batch[1]
        image = image.to(self.device, non_blocking=True).float()
        # The CIFAR batch augmentation yields NHWC batches; with SOLVER.CHANNELS_LAST off
        # the models get plain NCHW, as the per-image pipeline gives.
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        image = image.contiguous(memory_format=fmt) if image.dim() == 4 else image
        target = target.to(self.device, non_blocking=True)
        extras = {}
        names = getattr(batch, "_fields", ("image", "target", "index", "contrastive_index"))
        for name, value in zip(names[2:], batch[2:]):
            extras[name] = value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
        return image, target, extras

    def train_step(self, batch, epoch: int) -> Dict[str, torch.Tensor]:
        """Forward, optimize, metrics for one batch; no host sync.

        Returns ``{"loss": total (detached), "correct": (2,) top-1/top-5 hits, "n": batch size}``.
        """
        image, target, extras = self.unpack(batch)
        with self.autocast():
            preds, losses = self.model(image=image, target=target, epoch=epoch, **extras)
        total = self.optimize(losses)
        with torch.no_grad():
            correct = correct_topk(preds.detach().float(), target, (1, 5))
        return {"loss": total.detach().float(), "correct": correct, "n": image.shape[0]}

    # ------------------------------------------------------------------ epochs
    def _set_loader_epoch(self, epoch: int) -> None:
        for obj in (self.train_loader, getattr(self.train_loader, "sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
                return

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def run_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        self.lr = adjust_learning_rate(epoch, cfg, self.optimizer)
        seed_everything(int(cfg.EXPERIMENT.SEED) * 100_003 + epoch * 101 + rank())
        self._set_loader_epoch(epoch)
        self.model.train()
        for batch in self.train_loader:
            self.step_out = self.train_step(batch, epoch)
            self.global_step += 1
            self.after_step()

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        """One epoch with its hooks; returns its worklog values and ``lr``."""
        super().train_epoch(epoch)
        barrier()
        return dict(self.epoch_log, lr=self.lr)

    # ------------------------------------------------------------------ the run
    def resume(self) -> None:
        """Continue this run directory from ``latest``: weights, optimizer, best accuracy, the next epoch.

        Without a ``latest`` yet (a run killed in its first epoch), the run starts at epoch 1.
        """
        latest = os.path.join(self.log_path, "latest")
        if not os.path.isfile(latest):
            self.logger.info(f"--resume: no checkpoint in {self.log_path} yet; starting at epoch 1")
            if is_main() and os.path.isfile(self.logger.worklog):
                os.remove(self.logger.worklog)  # a fresh start: nothing of the killed run's log stays
            return
        run_ckpt.check_resumable_config(self.log_path, self.cfg)
        state = run_ckpt.load_latest(self)
        self.logger.resume_at(self.start_epoch - 1, self.global_step, state.get("log"))
        self.logger.info(f"resumed from {latest}: continuing at epoch {self.start_epoch}")

    def train(self, resume: bool = False) -> float:
        if is_main():
            remove_stale_temp_files(self.log_path)  # of writes a kill interrupted
        if resume:
            self.resume()
        if is_main():
            atomic_write_text(os.path.join(self.log_path, "cfg.yaml"), self.cfg.dump())
        self.run_loop()
        self.logger.info(f"best accuracy: {self.best_acc:.2f}", "EVAL")
        self.logger.write(f"best_acc\t{self.best_acc:.2f}\n")
        return self.best_acc


@TRAINERS.register("crd")
class CRDTrainer(BaseTrainer):
    """CRD's batches carry ``index`` and ``contrastive_index``; unlike mdistiller's, ``epoch=`` is passed too."""
