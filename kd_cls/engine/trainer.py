"""The classification trainer (mdistiller's ``BaseTrainer``, with resume, DDP, AMP and logging).

``SOLVER.TRAINER`` names a class of ``TRAINERS``: ``base`` and ``crd`` here;
other modules of ``kd_cls.engine`` whose name ends in ``trainer`` register
more (``dot``, ``crd_dot``) and are imported by :func:`get_trainer`.

A subclass changes the optimisation by overriding only

* ``build_optimizer() -> torch.optim.Optimizer`` (default: SGD with momentum
  and weight decay over ``distiller.get_learnable_parameters()``), and
* ``optimize(losses) -> Tensor`` (default: zero the gradients, back-propagate
  ``sum(l.mean())``, step; returns that total).

Batches are ``(image, target)``, ``(image, target, index)`` or ``(image,
target, index, contrastive_index)``; the distiller is called as
``distiller(image=, target=, epoch=, [index=, contrastive_index=])``.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.registry import Registry

from .checkpoint import CheckpointError, add_prefix, load_checkpoint, load_model_state, save_checkpoint, strip_prefix
from .distributed import all_reduce_sum, barrier, is_distributed, is_main, rank, training_device
from .logger import RunLogger
from .metrics import adjust_learning_rate, correct_topk, validate

__all__ = ["TRAINERS", "BaseTrainer", "CRDTrainer", "get_trainer", "NonFiniteLossError", "ResumeError",
           "config_differences", "AMP_DTYPES"]

TRAINERS = Registry("trainer")
AMP_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys that may differ between a run and its --resume: logging, and the length of the run.
RESUME_MUTABLE_PREFIXES = ("LOG.",)
RESUME_MUTABLE_KEYS = ("SOLVER.EPOCHS",)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (one-line message)."""


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run (one-line message)."""


def get_trainer(name: str):
    """The trainer class registered as ``name`` (unknown names list the valid ones)."""
    _import_trainer_modules()
    return TRAINERS.get(name)


def _import_trainer_modules() -> None:
    import importlib
    import pkgutil

    import kd_cls.engine as engine

    for info in pkgutil.iter_modules(engine.__path__):
        if info.name.endswith("trainer") and not info.name.startswith("_"):
            importlib.import_module(f"kd_cls.engine.{info.name}")


def _flatten(d, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> List[Tuple[str, object, object]]:
    """``[(key, old, new)]`` for keys that differ, ignoring those a resume may change."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k.startswith(RESUME_MUTABLE_PREFIXES) or k in RESUME_MUTABLE_KEYS:
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            diffs.append((k, va, vb))
    return diffs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@TRAINERS.register("base")
class BaseTrainer:
    """Train ``distiller`` on ``train_loader``, evaluate on ``val_loader`` every epoch.

    Writes to ``LOG.PREFIX/experiment_name``: ``cfg.yaml``, ``worklog.txt``,
    ``train.events`` (TensorBoard) and the checkpoints of
    :mod:`kd_cls.engine.checkpoint`.
    """

    def __init__(self, experiment_name: str, distiller: nn.Module, train_loader, val_loader, cfg):
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
        self.start_epoch = 1
        self.global_step = 0
        self.sync_every = 1 if self.device.type == "cpu" else 20
        self.log_path = os.path.join(cfg.LOG.PREFIX, experiment_name)
        if is_main():
            os.makedirs(self.log_path, exist_ok=True)
        self.logger = RunLogger(self.log_path, cfg, experiment_name, enabled=is_main())

    # ------------------------------------------------------------------ hooks for subclasses
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

    def init_optimizer(self, cfg):  # mdistiller's name
        return self.build_optimizer()

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
        for name, value in zip(("index", "contrastive_index"), batch[2:4]):
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

    def _flush(self, pending: list, sums: torch.Tensor, epoch: int, step: int) -> None:
        """Move the pending steps' metrics to the host; stop on a non-finite loss."""
        losses = torch.stack([p["loss"] for p in pending]).cpu()
        finite = torch.isfinite(losses)
        flag = torch.tensor([0.0 if bool(finite.all()) else 1.0])
        if is_distributed():
            flag = all_reduce_sum(flag.to(self.device)).cpu()
        if flag.item() > 0:
            bad = losses[~finite]
            value = bad[0].item() if len(bad) else float("nan")
            first = step - len(pending) + 1 + (int((~finite).nonzero()[0]) if len(bad) else 0)
            last = os.path.join(self.log_path, "latest")
            kept = f"the last good checkpoint is {last} (epoch {epoch - 1})" if epoch > 1 or self.start_epoch > 1 \
                else "no checkpoint was written"
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch}, step {first}; stopped, {kept}. "
                "Lower SOLVER.LR or check the data and loss weights"
            )
        for p, l in zip(pending, losses.tolist()):
            sums[0] += l * p["n"]
            sums[1:3] += p["correct"].double().cpu()
            sums[3] += p["n"]
        pending.clear()

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        from tqdm import tqdm

        cfg = self.cfg
        lr = adjust_learning_rate(epoch, cfg, self.optimizer)
        seed_everything(int(cfg.EXPERIMENT.SEED) * 100_003 + epoch * 101 + rank())
        self._set_loader_epoch(epoch)
        self.model.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss*n, correct1, correct5, n
        pending: list = []
        num_iter = len(self.train_loader)
        # A context, so that an error mid-epoch (a NaN loss) closes the bar before it is reported.
        with tqdm(total=num_iter, desc=f"epoch {epoch}/{cfg.SOLVER.EPOCHS}", disable=not is_main(),
                  mininterval=1.0, dynamic_ncols=True) as pbar:
            start = time.perf_counter()
            tb_freq = int(cfg.LOG.TENSORBOARD_FREQ)
            for i, batch in enumerate(self.train_loader):
                pending.append(self.train_step(batch, epoch))
                self.global_step += 1
                if len(pending) >= self.sync_every or i == num_iter - 1:
                    n_new = len(pending)
                    self._flush(pending, sums, epoch, i)
                    n = max(sums[3].item(), 1.0)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    pbar.update(n_new)
                    pbar.set_postfix(loss=f"{sums[0].item() / n:.4f}", top1=f"{100 * sums[1].item() / n:.2f}",
                                     img_s=f"{sums[3].item() / elapsed:.0f}", refresh=False)
                    if tb_freq > 0 and self.global_step % tb_freq < n_new:
                        self.logger.scalar("train/loss", sums[0].item() / n, self.global_step)
        if pending:
            self._flush(pending, sums, epoch, num_iter - 1)
        train_time = time.perf_counter() - start
        if is_distributed():
            sums = all_reduce_sum(sums.to(self.device)).cpu()
        n = max(sums[3].item(), 1.0)

        test_acc, test_top5, test_loss = validate(self.val_loader, self.distiller, self.device, self.autocast)
        log = OrderedDict(
            train_acc=100 * sums[1].item() / n,
            train_loss=sums[0].item() / n,
            test_acc=test_acc,
            test_acc_top5=test_top5,
            test_loss=test_loss,
        )
        improved = test_acc >= self.best_acc
        self.best_acc = max(self.best_acc, test_acc)
        self.logger.epoch(epoch, lr, log)
        self.logger.wandb_log({}, summary={"best_acc": self.best_acc})
        self.logger.info(
            f"epoch {epoch}: train loss {log['train_loss']:.4f} top-1 {log['train_acc']:.2f} | "
            f"test top-1 {test_acc:.2f} top-5 {test_top5:.2f} loss {test_loss:.4f} | best {self.best_acc:.2f} | "
            f"{sums[3].item() / max(train_time, 1e-9):.0f} img/s",
            "EVAL",
        )
        if is_main():
            self.save(epoch, improved)
        barrier()
        return dict(log, lr=lr)

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, epoch: int) -> dict:
        state = {
            "epoch": epoch,
            "model": add_prefix(self.distiller.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "best_acc": self.best_acc,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, epoch: int, improved: bool) -> None:
        state = self.full_state(epoch)
        student = {"model": self.distiller.student.state_dict()}
        p = self.log_path
        save_checkpoint(state, os.path.join(p, "latest"))
        save_checkpoint(student, os.path.join(p, "student_latest"))
        freq = int(self.cfg.LOG.SAVE_CHECKPOINT_FREQ)
        if freq > 0 and epoch % freq == 0:
            save_checkpoint(state, os.path.join(p, f"epoch_{epoch}"))
            save_checkpoint(student, os.path.join(p, f"student_{epoch}"))
        if improved:
            save_checkpoint(state, os.path.join(p, "best"))
            save_checkpoint(student, os.path.join(p, "student_best"))

    def resume(self) -> None:
        """Load ``latest`` of this run directory: weights, optimizer, best accuracy; continue at the next epoch."""
        import yaml

        cfg_path = os.path.join(self.log_path, "cfg.yaml")
        latest = os.path.join(self.log_path, "latest")
        if not os.path.isfile(latest):
            raise ResumeError(f"--resume: no checkpoint at {latest}; start the run without --resume")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                old = yaml.safe_load(f) or {}
            diffs = config_differences(old, yaml.safe_load(self.cfg.dump()))
            if diffs:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:4])
                more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
                raise ResumeError(
                    f"--resume refuses a config that differs from the run's {cfg_path}: {shown}{more}; "
                    "only LOG.* and SOLVER.EPOCHS may change"
                )
        state = load_checkpoint(latest, map_location=self.device)
        try:
            load_model_state(self.distiller, strip_prefix(state["model"]), latest, "distiller")
            self.optimizer.load_state_dict(state["optimizer"])
        except KeyError as e:
            raise CheckpointError(f"{latest} lacks {e} (not a full-state checkpoint)") from None
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.best_acc = float(state.get("best_acc", -1.0))
        self.start_epoch = int(state["epoch"]) + 1
        self.logger.info(f"resumed from {latest}: continuing at epoch {self.start_epoch}")

    # ------------------------------------------------------------------ the run
    def evaluate_teacher(self) -> Optional[float]:
        teacher = getattr(self.distiller, "teacher", None)
        if teacher is None:
            return None
        top1, top5, loss = validate(self.val_loader, teacher, self.device, self.autocast, desc="teacher")
        self.logger.info(f"teacher top-1 {top1:.2f} top-5 {top5:.2f} loss {loss:.4f}", "EVAL")
        self.logger.write(f"teacher_acc: {top1:.2f}\n")
        return top1

    def train(self, resume: bool = False) -> float:
        if resume:
            self.resume()
        if is_main():
            with open(os.path.join(self.log_path, "cfg.yaml"), "w") as f:
                f.write(self.cfg.dump())
        if self.cfg.LOG.EVAL_TEACHER:
            self.evaluate_teacher()
        for epoch in range(self.start_epoch, int(self.cfg.SOLVER.EPOCHS) + 1):
            self.train_epoch(epoch)
        self.logger.info(f"best accuracy: {self.best_acc:.2f}", "EVAL")
        self.logger.write(f"best_acc\t{self.best_acc:.2f}\n")
        self.logger.close()
        return self.best_acc


@TRAINERS.register("crd")
class CRDTrainer(BaseTrainer):
    """CRD's batches carry ``index`` and ``contrastive_index``; unlike mdistiller's, ``epoch=`` is passed too."""
