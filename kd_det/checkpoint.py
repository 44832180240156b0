"""Checkpoints of RCNNKD models.

* :class:`KDCheckpointer`: detectron2's ``DetectionCheckpointer`` that writes
  atomically (:func:`kd_cls.checkpoint_io.atomic_save`) and never lets a student-only file
  (e.g. an ImageNet ``.pkl``, whose names detectron2 matches by suffix) write
  into the teacher.
* :func:`load_teacher_weights`: ``TEACHER.MODEL.WEIGHTS`` (a detectron2 model-zoo
  ``.pkl`` or a ``.pth``) into ``model.teacher`` alone.
* :func:`export_student`: a file that loads into the plain detector of the student's family.
"""
from __future__ import annotations

import os

from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from kd_cls.checkpoint_io import atomic_save

__all__ = ["KDCheckpointer", "export_student", "load_teacher_weights"]


def _unwrap(model):
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


class KDCheckpointer(DetectionCheckpointer):
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk or "://" in self.save_dir:
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

    def _load_model(self, checkpoint):
        model = _unwrap(self.model)
        if not hasattr(model, "teacher") or any(k.startswith("teacher.") for k in checkpoint["model"]):
            return super()._load_model(checkpoint)
        # A student-only file: keep the teacher exactly as it is.
        teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
        loaded_before = set(model._teacher_loaded_keys)
        incompatible = super()._load_model(checkpoint)
        model.teacher.load_state_dict(teacher_state)
        model._teacher_loaded_keys = loaded_before
        if incompatible is not None:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith("teacher.")]
        return incompatible


def load_teacher_weights(model, path: str) -> None:
    """Load ``path`` into ``model.teacher`` (keys as in a plain detector) and record what was loaded.

    A file of the combined layout (keys under ``teacher.``) is accepted too.
    """
    teacher = model.teacher
    if not path.startswith(("detectron2://", "http://", "https://", "catalog://")) and not os.path.isfile(path):
        raise FileNotFoundError(
            f"TEACHER.MODEL.WEIGHTS file not found: {path} (put the teacher's detectron2 .pkl/.pth there)"
        )
    ckpt = DetectionCheckpointer(teacher)
    data = ckpt._load_file(ckpt.path_manager.get_local_path(path))
    state = data.get("model", data)
    if any(k.startswith("teacher.") for k in state):
        state = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    data["model"] = state
    incompatible = ckpt._load_model(data)
    missing = set(incompatible.missing_keys) if incompatible is not None else set()
    model.mark_teacher_keys_loaded(set(teacher.state_dict().keys()) - missing)
    if incompatible is not None:
        ckpt._log_incompatible_keys(incompatible)


def export_student(model, path: str) -> str:
    """Write ``{"model": student-only state dict}`` to ``path`` (atomic); returns ``path``."""
    model = _unwrap(model)
    state = model.student_state_dict() if hasattr(model, "student_state_dict") else model.state_dict()
    atomic_save({"model": {k: v.detach().cpu() for k, v in state.items()}}, path)
    return path
