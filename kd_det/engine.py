"""Training and evaluation with detectron2's ``DefaultTrainer`` for RCNNKD (and plain) detectors.

``KDTrainer`` differs from ``DefaultTrainer`` in five ways:

* models come from :func:`kd_det.build_kd_model` (known-name checks, and the
  fast RoIAlign backward of ``KD.FAST_ROI_ALIGN``);
* checkpoints go through :class:`kd_det.checkpoint.KDCheckpointer` (atomic
  writes; the teacher is in them, so ``--resume`` restores it);
* COCO evaluation uses ``COCOEvaluator(use_fast_impl=False)`` (pycocotools);
* after loading weights, an RCNNKD model whose teacher was not loaded stops
  training with :class:`kd_det.meta_arch.TeacherNotLoadedError`;
* at the end of training it writes ``model_student.pth`` (student only,
  loadable into a plain ``GeneralizedRCNN``) to ``OUTPUT_DIR``.
"""
from __future__ import annotations

import logging
import os
import weakref

from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from kd_det.checkpoint import KDCheckpointer, export_student
from kd_det.config import build_teacher_cfg

__all__ = ["KDTrainer", "STUDENT_FILE", "evaluate_teacher"]

STUDENT_FILE = "model_student.pth"
logger = logging.getLogger("kd_det")


def _unwrap(model):
    return getattr(model, "module", model) if not hasattr(model, "teacher") else model


class _ExportStudent(hooks.HookBase):
    def after_train(self):
        model = _unwrap(self.trainer.model)
        if comm.is_main_process() and hasattr(model, "student_state_dict"):
            path = export_student(model, os.path.join(self.trainer.cfg.OUTPUT_DIR, STUDENT_FILE))
            logger.info(f"student-only weights written to {path}")


class KDTrainer(DefaultTrainer):
    @classmethod
    def build_model(cls, cfg):
        from kd_det import build_kd_model

        model = build_kd_model(cfg)
        logger.info(f"Model:\n{model}")
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer just before calling this.
        self.checkpointer = KDCheckpointer(self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        ret = super().build_hooks()
        ret.insert(len(ret) - 1, _ExportStudent())  # before the writers, after eval
        return ret

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        model = _unwrap(self.model)
        if hasattr(model, "check_teacher_loaded"):
            model.check_teacher_loaded()


def evaluate_teacher(cfg, model):
    """COCO metrics of ``model.teacher`` on ``cfg.DATASETS.TEST``.

    The test images are read in the teacher's INPUT.FORMAT, at the student's sizes.
    """
    teacher = _unwrap(model).teacher
    tcfg = build_teacher_cfg(cfg).clone()
    tcfg.defrost()
    fmt = tcfg.INPUT.FORMAT
    tcfg.INPUT = cfg.INPUT.clone()
    tcfg.INPUT.defrost()
    tcfg.INPUT.FORMAT = fmt
    tcfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "teacher")
    tcfg.DATALOADER.NUM_WORKERS = cfg.DATALOADER.NUM_WORKERS
    tcfg.TEST = cfg.TEST.clone()
    tcfg.freeze()
    evaluators = [KDTrainer.build_evaluator(tcfg, name) for name in tcfg.DATASETS.TEST]
    return KDTrainer.test(tcfg, teacher, evaluators)
