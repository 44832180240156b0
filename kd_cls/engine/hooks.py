"""The classification trainer's hooks: teacher evaluation, the non-finite-loss guard,
progress, evaluation, checkpoints and the worklog/TensorBoard writer.

Registered in this order by :meth:`kd_cls.engine.trainers.BaseTrainer.build_hooks`;
at the end of an epoch the guard flushes the last steps, the evaluation sets
``trainer.epoch_log``, the checkpoint is written, and only then the worklog and
TensorBoard, so that a kill never logs an epoch that ``latest`` does not hold.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict

import torch

from .checkpoint import save_run_checkpoints
from .distributed import all_reduce_sum, is_distributed, is_main
from .metrics import validate
from .train_loop import HookBase

__all__ = ["NonFiniteLossError", "TeacherEval", "LossGuard", "ProgressBar", "EvalHook", "CheckpointHook",
           "LogWriter"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (one-line message)."""


class TeacherEval(HookBase):
    """Before training: the teacher's own top-1 on the validation set (``LOG.EVAL_TEACHER``)."""

    def before_train(self):
        t = self.trainer
        teacher = getattr(t.distiller, "teacher", None)
        if teacher is None or not t.cfg.LOG.EVAL_TEACHER or t.start_epoch > 1:
            return
        top1, top5, loss = validate(t.val_loader, teacher, t.device, t.autocast, desc="teacher")
        t.logger.info(f"teacher top-1 {top1:.2f} top-5 {top5:.2f} loss {loss:.4f}", "EVAL")
        t.logger.write(f"teacher_acc: {top1:.2f}\n")


class LossGuard(HookBase):
    """Moves step metrics to the host every ``trainer.sync_every`` steps and stops on a non-finite loss.

    Holds the epoch's sums ``[loss * n, top-1 hits, top-5 hits, n]``; ``flushed``
    is the number of steps the last ``after_step`` moved (0 if none).
    """

    def before_epoch(self):
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.pending = []
        self.flushed = 0
        self.step_in_epoch = -1
        self.start = time.perf_counter()

    def after_step(self):
        t = self.trainer
        self.step_in_epoch += 1
        self.pending.append(t.step_out)
        last = self.step_in_epoch == t.steps_per_epoch - 1
        self.flushed = self.flush() if (len(self.pending) >= t.sync_every or last) else 0

    def flush(self) -> int:
        t = self.trainer
        pending, n_new = self.pending, len(self.pending)
        if not pending:
            return 0
        losses = torch.stack([p["loss"] for p in pending]).cpu()
        finite = torch.isfinite(losses)
        flag = torch.tensor([0.0 if bool(finite.all()) else 1.0])
        if is_distributed():
            flag = all_reduce_sum(flag.to(t.device)).cpu()
        if flag.item() > 0:
            bad = losses[~finite]
            value = bad[0].item() if len(bad) else float("nan")
            first = self.step_in_epoch - n_new + 1 + (int((~finite).nonzero()[0]) if len(bad) else 0)
            epoch = t.epoch
            last = os.path.join(t.log_path, "latest")
            kept = f"the last good checkpoint is {last} (epoch {epoch - 1})" if epoch > 1 \
                else "no checkpoint was written"
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch}, step {first}; stopped, {kept}. "
                "Lower SOLVER.LR or check the data and loss weights"
            )
        for p, value in zip(pending, losses.tolist()):
            self.sums[0] += value * p["n"]
            self.sums[1:3] += p["correct"].double().cpu()
            self.sums[3] += p["n"]
        self.pending = []
        return n_new

    def after_epoch(self):
        t = self.trainer
        self.flush()
        self.train_time = time.perf_counter() - self.start
        sums = all_reduce_sum(self.sums.to(t.device)).cpu() if is_distributed() else self.sums
        n = max(sums[3].item(), 1.0)
        t.train_metrics = {"train_acc": 100 * sums[1].item() / n, "train_loss": sums[0].item() / n,
                           "images": sums[3].item(), "seconds": self.train_time}

    def running(self):
        """``(mean loss, top-1 %, images/s)`` of the epoch so far."""
        n = max(self.sums[3].item(), 1.0)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.sums[0].item() / n, 100 * self.sums[1].item() / n, self.sums[3].item() / elapsed


class ProgressBar(HookBase):
    """A tqdm bar per epoch (main process only); closed at the epoch's end or when training stops."""

    def __init__(self):
        self.bar = None

    def before_epoch(self):
        from tqdm import tqdm

        t = self.trainer
        self.bar = tqdm(total=t.steps_per_epoch, desc=f"epoch {t.epoch}/{t.max_epoch}", disable=not is_main(),
                        mininterval=1.0, dynamic_ncols=True)

    def after_step(self):
        guard = self.trainer.hook(LossGuard)
        if self.bar is None or guard is None or not guard.flushed:
            return
        loss, top1, img_s = guard.running()
        self.bar.update(guard.flushed)
        self.bar.set_postfix(loss=f"{loss:.4f}", top1=f"{top1:.2f}", img_s=f"{img_s:.0f}", refresh=False)

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_epoch(self):
        self._close()

    def after_train(self):
        self._close()


class EvalHook(HookBase):
    """After each epoch: top-1/top-5/loss on the validation set, the best accuracy, ``trainer.epoch_log``."""

    def after_epoch(self):
        t = self.trainer
        test_acc, test_top5, test_loss = validate(t.val_loader, t.distiller, t.device, t.autocast)
        m = t.train_metrics
        t.epoch_log = OrderedDict(train_acc=m["train_acc"], train_loss=m["train_loss"], test_acc=test_acc,
                                  test_acc_top5=test_top5, test_loss=test_loss)
        t.improved = test_acc >= t.best_acc
        t.best_acc = max(t.best_acc, test_acc)
        t.logger.info(
            f"epoch {t.epoch}: train loss {m['train_loss']:.4f} top-1 {m['train_acc']:.2f} | "
            f"test top-1 {test_acc:.2f} top-5 {test_top5:.2f} loss {test_loss:.4f} | best {t.best_acc:.2f} | "
            f"{m['images'] / max(m['seconds'], 1e-9):.0f} img/s",
            "EVAL",
        )


class CheckpointHook(HookBase):
    """After each epoch's evaluation: ``latest``, ``best`` and ``epoch_N`` (main process; see ``checkpoint``)."""

    def after_epoch(self):
        t = self.trainer
        if is_main():
            save_run_checkpoints(t, t.epoch, t.improved, dict(t.epoch_log, lr=t.lr))


class LogWriter(HookBase):
    """The epoch's block in ``worklog.txt`` and its TensorBoard/W&B scalars, written after the checkpoint;
    the running training loss every ``LOG.TENSORBOARD_FREQ`` steps."""

    def after_step(self):
        t = self.trainer
        guard = t.hook(LossGuard)
        freq = int(t.cfg.LOG.TENSORBOARD_FREQ)
        if freq > 0 and guard is not None and guard.flushed and t.global_step % freq < guard.flushed:
            t.logger.scalar("train/loss", guard.running()[0], t.global_step)

    def after_epoch(self):
        t = self.trainer
        t.logger.epoch(t.epoch, t.lr, t.epoch_log)
        t.logger.wandb_log({}, summary={"best_acc": t.best_acc})

    def after_train(self):
        self.trainer.logger.close()
