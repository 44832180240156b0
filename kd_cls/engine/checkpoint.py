"""A classification run's checkpoint files, in mdistiller's layout, and ``--resume``.

Files (names and dicts as mdistiller's trainer writes them):

* full state ``latest``, ``best``, ``epoch_N``: ``{"epoch", "model", "optimizer",
  "best_acc"}``, where ``model`` is the distiller's state dict with
  DataParallel's ``module.`` prefix, so mdistiller's ``--resume`` reads ours;
  either form loads here. Ours add ``"log"`` (the epoch's worklog values), so
  the worklog can be made to match ``latest`` exactly after a kill;
  Ours also record ``"global_step"``, where TensorBoard's step curves continue;
* student only ``student_latest``, ``student_best``, ``student_N``:
  ``{"model": student.state_dict()}`` (what ``tools/eval.py -c`` takes).

Every write is atomic (:func:`kd_cls.checkpoint_io.atomic_save`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from kd_cls.checkpoint_io import CheckpointError, add_prefix, atomic_save, load_checkpoint, load_model_state, \
    strip_prefix

__all__ = ["ResumeError", "RESUME_MUTABLE_PREFIXES", "RESUME_MUTABLE_KEYS", "config_differences",
           "full_state", "save_run_checkpoints", "load_latest", "check_resumable_config"]

# Keys that may differ between a run and its --resume: logging, the length of the run, and the
# teacher cache (it gives the teacher's own logits, so it may be turned on or off mid-run).
RESUME_MUTABLE_PREFIXES = ("LOG.",)
RESUME_MUTABLE_KEYS = ("SOLVER.EPOCHS", "SOLVER.TEACHER_CACHE")


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run (one-line message)."""


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


def full_state(trainer, epoch: int, log: Dict[str, float]) -> dict:
    state = {
        "epoch": epoch,
        "model": add_prefix(trainer.distiller.state_dict()),
        "optimizer": trainer.optimizer.state_dict(),
        "best_acc": trainer.best_acc,
        "log": dict(log),
        "global_step": trainer.global_step,
    }
    if trainer.scaler is not None:
        state["scaler"] = trainer.scaler.state_dict()
    return state


def save_run_checkpoints(trainer, epoch: int, improved: bool, log: Dict[str, float]) -> None:
    """Write this epoch's files. ``best`` goes before ``latest``: a kill between the two leaves
    ``latest`` at the previous epoch, whose ``best_acc`` the old ``best`` still matches."""
    state = full_state(trainer, epoch, log)
    student = {"model": trainer.distiller.student.state_dict()}
    p = trainer.log_path
    if improved:
        atomic_save(state, os.path.join(p, "best"))
        atomic_save(student, os.path.join(p, "student_best"))
    freq = int(trainer.cfg.LOG.SAVE_CHECKPOINT_FREQ)
    if freq > 0 and epoch % freq == 0:
        atomic_save(state, os.path.join(p, f"epoch_{epoch}"))
        atomic_save(student, os.path.join(p, f"student_{epoch}"))
    atomic_save(student, os.path.join(p, "student_latest"))
    atomic_save(state, os.path.join(p, "latest"))


def check_resumable_config(log_path: str, cfg) -> None:
    """Refuse ``--resume`` with a config that differs from the run's ``cfg.yaml`` beyond ``LOG.*``/``SOLVER.EPOCHS``."""
    import yaml

    cfg_path = os.path.join(log_path, "cfg.yaml")
    if not os.path.isfile(cfg_path):
        return
    with open(cfg_path) as f:
        old = yaml.safe_load(f) or {}
    diffs = config_differences(old, yaml.safe_load(cfg.dump()))
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ResumeError(
            f"--resume refuses a config that differs from the run's {cfg_path}: {shown}{more}; "
            "only LOG.* and SOLVER.EPOCHS may change"
        )


def load_latest(trainer) -> dict:
    """Load ``latest`` into the trainer (weights, optimizer, scaler, best accuracy); returns the checkpoint."""
    latest = os.path.join(trainer.log_path, "latest")
    state = load_checkpoint(latest, map_location=trainer.device)
    try:
        load_model_state(trainer.distiller, strip_prefix(state["model"]), latest, "distiller")
        trainer.optimizer.load_state_dict(state["optimizer"])
    except KeyError as e:
        raise CheckpointError(f"{latest} lacks {e} (not a full-state checkpoint)") from None
    if trainer.scaler is not None and "scaler" in state:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.best_acc = float(state.get("best_acc", -1.0))
    trainer.start_epoch = int(state["epoch"]) + 1
    trainer.global_step = int(state.get("global_step", 0))
    return state
