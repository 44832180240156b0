"""From a config to a trained run, and from a checkpoint to an accuracy line.

``train_from_cfg`` is what ``tools/train.py`` and ``tools/demo.py`` call;
``evaluate_checkpoint`` is ``tools/eval.py``.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence, Tuple

import torch

from kd_cls.checkpoint_io import load_weights_file
from kd_cls.data import get_dataset_info
from kd_cls.distillers import DISTILLERS, build_distiller
from kd_cls.models import build_model, model_names
from kd_cls.models.pretrained import MDISTILLER_RELEASE, load_pretrained, load_teacher
from kd_cls.registry import UnknownNameError

from .checkpoint import RESUME_MUTABLE_KEYS, RESUME_MUTABLE_PREFIXES
from .defaults import get_cfg
from .distributed import barrier, init_distributed, is_main
from .logger import log_msg
from .metrics import validate
from .preflight import check_output_dir, check_values
from .teacher_cache import attach_teacher_cache
from .trainers import get_trainer, seed_everything

__all__ = ["experiment_name", "build_run", "train_from_cfg", "evaluate_checkpoint", "OVERRIDE_SEPARATOR"]

# Between the tag and the CLI overrides in a run directory's name (mdistiller puts nothing there).
OVERRIDE_SEPARATOR = "+"
_MAX_NAME = 200


def experiment_name(cfg, opts: Sequence[str] = ()) -> str:
    """``EXPERIMENT.PROJECT/<EXPERIMENT.NAME or EXPERIMENT.TAG>[+KEY:VALUE,...]``, as mdistiller names runs.

    Overrides of ``LOG.*`` keys, ``SOLVER.EPOCHS`` and ``SOLVER.TEACHER_CACHE`` are left out, so that
    ``--resume`` with other logging options, more epochs or the cache on or off finds the same run.
    ``/`` in values becomes ``_``.
    """
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    pairs = [(k, v) for k, v in zip(opts[::2], opts[1::2])
             if not str(k).startswith(RESUME_MUTABLE_PREFIXES) and k not in RESUME_MUTABLE_KEYS]
    if pairs:
        extra = ",".join(f"{k}:{v}" for k, v in pairs).replace(os.sep, "_").replace(" ", "")
        name = f"{name}{OVERRIDE_SEPARATOR}{extra}"
    if len(name) > _MAX_NAME:  # file systems cap a name at 255 bytes
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:_MAX_NAME - 11]}_{digest}"
    return os.path.join(cfg.EXPERIMENT.PROJECT, name)


def _check_names(cfg) -> None:
    """Fail on unknown dataset, method, trainer or model names before any data is read."""
    get_dataset_info(cfg.DATASET.TYPE)
    DISTILLERS.get(cfg.DISTILLER.TYPE)
    get_trainer(cfg.SOLVER.TRAINER)
    names = model_names(cfg.DATASET.TYPE)
    roles = [("DISTILLER.STUDENT", cfg.DISTILLER.STUDENT)]
    if cfg.DISTILLER.TYPE.upper() != "NONE":
        roles.append(("DISTILLER.TEACHER", cfg.DISTILLER.TEACHER))
    for key, name in roles:
        if name not in names:
            raise UnknownNameError(
                f"unknown model {name!r} ({key}) for dataset {cfg.DATASET.TYPE!r}. Valid choices: {', '.join(names)}"
            )


def build_run(cfg, opts: Sequence[str] = (), resume: bool = False):
    """Data, models, distiller and trainer for ``cfg`` (frozen or not). Returns the trainer.

    Everything that can be checked is checked before the run directory is
    created: names, values, the output folder (a run directory that already
    holds a run needs ``resume``), the data, the teacher's weights and the
    method's feature shapes (a probe on one random image).
    """
    init_distributed()
    _check_names(cfg)
    check_values(cfg)
    name = experiment_name(cfg, opts)
    check_output_dir(os.path.join(cfg.LOG.PREFIX, name), "LOG.PREFIX", resume=resume, cfg=cfg)
    barrier()  # every rank has checked before the main one creates the directory
    seed_everything(int(cfg.EXPERIMENT.SEED))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    info = get_dataset_info(cfg.DATASET.TYPE)
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    with_contrastive = bool(getattr(method, "contrastive", False))
    train_loader, val_loader, num_data, num_classes = info.build(cfg, with_contrastive)

    teacher = None
    if cfg.DISTILLER.TYPE.upper() != "NONE":
        if is_main():
            print(log_msg(f"loading teacher {cfg.DISTILLER.TEACHER}"), flush=True)
        teacher = load_teacher(cfg, num_classes)
    student = build_model(cfg.DISTILLER.STUDENT, num_classes=num_classes, dataset=cfg.DATASET.TYPE)
    distiller = build_distiller(cfg, student, teacher, num_data=num_data)
    if teacher is not None and is_main():
        print(log_msg(f"extra parameters of {cfg.DISTILLER.TYPE}: {distiller.get_extra_parameters()}"), flush=True)
        for note in distiller.extra_parameter_notes():
            print(log_msg(note), flush=True)
    distiller.check_shapes(info.image_size)
    attach_teacher_cache(cfg, distiller, train_loader)
    trainer_cls = get_trainer(cfg.SOLVER.TRAINER)
    return trainer_cls(name, distiller, train_loader, val_loader, cfg)


def train_from_cfg(cfg, opts: Sequence[str] = (), resume: bool = False):
    """Build the run of ``cfg`` and train it. Returns the trainer (``best_acc``, ``log_path``)."""
    trainer = build_run(cfg, opts, resume=resume)
    trainer.train(resume=resume)
    return trainer


def evaluate_checkpoint(model_name: str, ckpt: str = "pretrain", dataset: str = "cifar100", batch_size: int = 64,
                        cfg=None) -> Tuple[float, float, float]:
    """``(top1, top5, loss)`` of zoo model ``model_name`` with weights ``ckpt`` on ``dataset``'s validation set.

    ``ckpt="pretrain"`` takes the model's default (released) checkpoint.
    """
    info = get_dataset_info(dataset)
    cfg = cfg.clone() if cfg is not None else get_cfg()
    cfg.defrost()
    cfg.DATASET.TYPE = dataset
    cfg.DATASET.TEST.BATCH_SIZE = batch_size
    if ckpt == "pretrain":
        model = load_pretrained(model_name, dataset, info.num_classes, what="model")
    else:
        model = build_model(model_name, num_classes=info.num_classes, dataset=dataset)
        load_weights_file(model, ckpt, what=f"model {model_name}",
                          hint=f"check -c; mdistiller's released checkpoints are at {MDISTILLER_RELEASE} "
                               "(put them in ./download_ckpts)")
    val_loader = info.build_val(cfg, batch_size)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return validate(val_loader, model.to(device), device)
