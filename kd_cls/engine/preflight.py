"""Checks that run before a run directory is created, so that bad input leaves nothing behind.

Each failure is one line naming the bad value and what is valid or what to do
(the CLIs print it as ``error: ...`` and exit with status 2).
"""
from __future__ import annotations

import os
import tempfile

from kd_cls.config import ConfigError

from .checkpoint import ResumeError, check_resumable_config

__all__ = ["check_values", "check_output_dir", "RUN_FILES"]

# A directory holding any of these holds a run.
RUN_FILES = ("cfg.yaml", "worklog.txt", "latest")


def check_values(cfg) -> None:
    """Values no run can use."""
    epochs = int(cfg.SOLVER.EPOCHS)
    if epochs < 1:
        raise ConfigError(f"SOLVER.EPOCHS {epochs} is not a number of epochs; give 1 or more")
    for key, value in (("SOLVER.BATCH_SIZE", cfg.SOLVER.BATCH_SIZE), ("DATASET.TEST.BATCH_SIZE", cfg.DATASET.TEST.BATCH_SIZE)):
        if int(value) < 1:
            raise ConfigError(f"{key} {value} is not a batch size; give 1 or more")
    if float(cfg.SOLVER.LR) <= 0:
        raise ConfigError(f"SOLVER.LR {cfg.SOLVER.LR} must be positive")


def _first_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_output_dir(log_path: str, prefix_key: str = "LOG.PREFIX", resume: bool = False, cfg=None) -> None:
    """The run directory can be created (or continued), and is not another run's without ``--resume``."""
    existing = _first_existing(log_path)
    if not os.path.isdir(existing):
        raise ConfigError(f"{prefix_key}: cannot create {log_path}: {existing} is a file, not a folder; "
                          "choose another output folder")
    try:  # a real probe: os.access says yes to root even where the file system refuses
        os.rmdir(tempfile.mkdtemp(prefix=".kd-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(f"{prefix_key}: cannot create {log_path}: {existing} is not writable "
                          f"({e.strerror or type(e).__name__}); choose a writable output folder") from None
    holds_run = os.path.isdir(log_path) and any(os.path.exists(os.path.join(log_path, f)) for f in RUN_FILES)
    if holds_run and not resume:
        raise ResumeError(f"{log_path} already holds a run; continue it with --resume, or start a new one with "
                          "another EXPERIMENT.NAME or LOG.PREFIX")
    if holds_run and cfg is not None:
        check_resumable_config(log_path, cfg)
