"""The epoch loop and its hook points (detectron2's ``engine/train_loop.py``, counted in epochs).

A :class:`TrainLoop` runs ``before_train``, then per epoch ``before_epoch``,
its steps (``after_step`` after each), ``after_epoch``, and finally
``after_train`` (also when an epoch raises, so hooks can close what they
opened). What a run does besides the step (evaluation, checkpoints, the
non-finite-loss guard, logging, progress) lives in hooks
(:mod:`kd_cls.engine.hooks`); the step itself belongs to the trainer
(:mod:`kd_cls.engine.trainers`).
"""
from __future__ import annotations

import weakref
from typing import Iterable, List, Optional

__all__ = ["HookBase", "TrainLoop"]


class HookBase:
    """A hook's five points; ``self.trainer`` is set (as a weak proxy) when it is registered.

    Hooks run in registration order at every point.
    """

    trainer = None

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class TrainLoop:
    """Epochs ``start_epoch .. max_epoch`` (inclusive) of ``run_epoch``, with hooks around them.

    Subclasses implement :meth:`run_epoch`, which calls :meth:`after_step`
    after each step. During an epoch, ``self.epoch`` is its number (from 1).
    """

    def __init__(self):
        self._hooks: List[HookBase] = []
        self.epoch = 0
        self.start_epoch = 1
        self.max_epoch = 0

    def register_hooks(self, hooks: Iterable[Optional[HookBase]]) -> None:
        for h in hooks:
            if h is None:
                continue
            # A weak proxy: a hook held elsewhere must not keep the trainer alive.
            h.trainer = weakref.proxy(self)
            self._hooks.append(h)

    @property
    def hooks(self) -> List[HookBase]:
        return list(self._hooks)

    def hook(self, cls):
        """The registered hook of type ``cls`` (or None)."""
        return next((h for h in self._hooks if isinstance(h, cls)), None)

    def _call(self, point: str) -> None:
        for h in self._hooks:
            getattr(h, point)()

    def after_step(self) -> None:
        self._call("after_step")

    def run_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def train_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._call("before_epoch")
        self.run_epoch(epoch)
        self._call("after_epoch")

    def run_loop(self) -> None:
        self._call("before_train")
        try:
            for epoch in range(self.start_epoch, self.max_epoch + 1):
                self.train_epoch(epoch)
        finally:
            self._call("after_train")
