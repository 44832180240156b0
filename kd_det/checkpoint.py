"""Checkpoints of distilled detectors: the student without the frozen teacher's tensors.

* :class:`KDCheckpointer`: detectron2's ``DetectionCheckpointer`` that writes
  atomically (:func:`kd_cls.checkpoint_io.atomic_save`, mode 0644) and, for a
  distiller, saves the student, the KD modules, optimizer and scheduler plus the
  teacher's *weight source* (``{"path", "sha256"}``, or ``{"random_seed"}`` for a
  random teacher) instead of its tensors. Loading such a checkpoint reloads the
  teacher from its source and refuses, in one line, a file that changed or is
  gone. A checkpoint that holds the teacher (older runs, mdistiller's combined
  files, ``KD.SAVE_TEACHER True``) restores it from its own tensors. A
  student-only file (an ImageNet ``.pkl``, whose names detectron2 matches by
  suffix) never writes into the teacher.
* :func:`load_teacher_weights`: ``TEACHER.MODEL.WEIGHTS`` (a detectron2
  model-zoo ``.pkl`` or a ``.pth``) into ``model.teacher`` alone.
* :func:`export_student`: a file that loads into the plain detector of the student's family.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from kd_cls.checkpoint_io import CheckpointError, atomic_save, file_sha256

__all__ = ["KDCheckpointer", "export_student", "load_teacher_weights", "restore_teacher", "TEACHER_SOURCE_KEY"]

TEACHER_SOURCE_KEY = "teacher_source"
_REMOTE = ("detectron2://", "http://", "https://", "catalog://")


def _unwrap(model):
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def _file_source(path: str) -> dict:
    return {"path": os.path.abspath(path), "sha256": file_sha256(path)}


def restore_teacher(model, source: Optional[dict], origin: str) -> None:
    """Make ``model.teacher`` the one ``source`` describes (from a checkpoint named ``origin``)."""
    if not source or source == model.teacher_source:
        return
    if "random_seed" in source:
        raise CheckpointError(
            f"{origin} was trained against a random teacher (KD.ALLOW_RANDOM_TEACHER), built with seed "
            f"{source['random_seed']}; resume it with KD.ALLOW_RANDOM_TEACHER True")
    path = source.get("path", "")
    if not os.path.isfile(path):
        raise CheckpointError(f"{origin}: the teacher's weights {path} are gone; put the file back (sha256 "
                              f"{source.get('sha256', '?')[:12]}...) to resume with the same teacher")
    if file_sha256(path) != source.get("sha256"):
        raise CheckpointError(f"{origin}: the teacher's weights {path} changed since the run started (sha256 "
                              f"differs); restore the original file to resume with the same teacher")
    load_teacher_weights(model, path)


class KDCheckpointer(DetectionCheckpointer):
    """See the module docstring. ``save_teacher``: also write the teacher's tensors (mdistiller's layout)."""

    def __init__(self, model, save_dir: str = "", *, save_teacher: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.save_teacher = save_teacher
        self._loading: Optional[str] = None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk or "://" in self.save_dir:
            return super().save(name, **kwargs)
        model = _unwrap(self.model)
        state = self.model.state_dict()
        data = {"model": state}
        if hasattr(model, "teacher_source"):
            if not self.save_teacher:
                data["model"] = {k: v for k, v in state.items() if not k.startswith("teacher.")}
            data[TEACHER_SOURCE_KEY] = model.teacher_source
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

    def load(self, path: str, checkpointables=None):
        self._loading = path
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading = None

    def _load_model(self, checkpoint):
        model = _unwrap(self.model)
        if not hasattr(model, "teacher"):
            return super()._load_model(checkpoint)
        origin = self._loading or "the checkpoint"
        if any(k.startswith("teacher.") for k in checkpoint["model"]):
            incompatible = super()._load_model(checkpoint)
            if self._loading and "://" not in self._loading and os.path.isfile(self._loading):
                model.teacher_source = _file_source(self._loading)
            return incompatible
        restore_teacher(model, checkpoint.pop(TEACHER_SOURCE_KEY, None), origin)
        # The student (and KD modules) only: keep the teacher exactly as it is.
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
    if not path.startswith(_REMOTE) and not os.path.isfile(path):
        raise FileNotFoundError(
            f"TEACHER.MODEL.WEIGHTS file not found: {path} (put the teacher's detectron2 .pkl/.pth there)"
        )
    ckpt = DetectionCheckpointer(teacher)
    local = ckpt.path_manager.get_local_path(path)
    data = ckpt._load_file(local)
    state = data.get("model", data)
    if any(k.startswith("teacher.") for k in state):
        state = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    data["model"] = state
    incompatible = ckpt._load_model(data)
    missing = set(incompatible.missing_keys) if incompatible is not None else set()
    model.mark_teacher_keys_loaded(set(teacher.state_dict().keys()) - missing)
    if incompatible is not None:
        ckpt._log_incompatible_keys(incompatible)
    model.teacher_source = _file_source(local)


def export_student(model, path: str) -> str:
    """Write ``{"model": student-only state dict}`` to ``path`` (atomic); returns ``path``."""
    model = _unwrap(model)
    state = model.student_state_dict() if hasattr(model, "student_state_dict") else model.state_dict()
    atomic_save({"model": {k: v.detach().cpu() for k, v in state.items()}}, path)
    return path
