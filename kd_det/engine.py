"""Training and evaluation with detectron2's ``DefaultTrainer``, for distilled and plain detectors.

``KDTrainer`` differs from ``DefaultTrainer`` in seven ways:

* models come from :func:`kd_det.build.build_kd_model` (the distiller when
  ``KD.METHODS`` or ``RCNNKD`` asks for one; known-name checks; the fast
  RoIAlign backward of ``KD.FAST_ROI_ALIGN``);
* under several processes the model is wrapped in DistributedDataParallel on
  the CPU too (detectron2 0.6 passes GPU ``device_ids``), with
  ``find_unused_parameters`` for a distiller, whose methods' parameters may get
  no gradient in a step;
* checkpoints go through :class:`kd_det.checkpoint.KDCheckpointer` (atomic writes; the teacher's
  weight source instead of its frozen tensors);
* checkpoints hold the optimizer's state (detectron2 0.6's lose it, so a resume restarted momentum);
* COCO evaluation uses ``COCOEvaluator(use_fast_impl=False)`` (pycocotools);
* after loading weights, a distiller whose teacher was not loaded stops
  training with :class:`kd_det.distiller.TeacherNotLoadedError`;
* at the end of training it writes ``model_student.pth`` (student only,
  loadable into the plain detector of the student's family) to ``OUTPUT_DIR``.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch
from torch import nn

from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from kd_cls.checkpoint_io import remove_stale_temp_files

from .build import build_kd_model
from .checkpoint import KDCheckpointer, export_student
from .teacher_cfg import build_teacher_cfg

__all__ = ["KDTrainer", "STUDENT_FILE", "evaluate_teacher", "init_torchrun", "unwrap"]

STUDENT_FILE = "model_student.pth"
logger = logging.getLogger("kd_det")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, or the model itself."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def init_torchrun() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), on gloo without GPUs.

    detectron2 0.6's ``launch`` spawns NCCL workers, one per GPU; under
    ``torchrun`` each process is already a rank, so it joins the group here and
    creates detectron2's per-machine group. Returns False when not under torchrun.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "LOCAL_RANK" not in os.environ:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    if comm._LOCAL_PROCESS_GROUP is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        node = dist.get_rank() // local
        for i in range(world // local):
            group = dist.new_group(list(range(i * local, (i + 1) * local)))
            if i == node:
                comm._LOCAL_PROCESS_GROUP = group
    return True


def create_ddp_model(model: nn.Module) -> nn.Module:
    """DistributedDataParallel when several processes run: GPU ``device_ids`` only on the GPU."""
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[comm.get_local_rank()] if on_gpu else None, broadcast_buffers=False,
        find_unused_parameters=hasattr(model, "kd_methods"),
    )


class _ExportStudent(hooks.HookBase):
    def after_train(self):
        model = unwrap(self.trainer.model)
        if comm.is_main_process() and hasattr(model, "student_state_dict"):
            path = export_student(model, os.path.join(self.trainer.cfg.OUTPUT_DIR, STUDENT_FILE))
            logger.info(f"student-only weights written to {path}")


class KDTrainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ with this module's DDP wrapper and checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        if comm.is_main_process() and os.path.isdir(cfg.OUTPUT_DIR):
            remove_stale_temp_files(cfg.OUTPUT_DIR)  # of checkpoint writes a kill interrupted
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = KDCheckpointer(model, cfg.OUTPUT_DIR, save_teacher=bool(cfg.KD.SAVE_TEACHER),
                                           trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        model = build_kd_model(cfg)
        model.to(torch.device(cfg.MODEL.DEVICE))
        logger.info(f"Model:\n{model}")
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)

    def build_hooks(self):
        ret = super().build_hooks()
        ret.insert(len(ret) - 1, _ExportStudent())  # before the writers, after eval
        return ret

    def state_dict(self):
        # detectron2 0.6 leaves the optimizer (held by the inner SimpleTrainer) out of its checkpoints,
        # so --resume restarted the momentum; later detectron2 versions save it under "_trainer".
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def train(self):
        """Train; returns the final evaluation's results (detectron2's returns them only with EXPECTED_RESULTS)."""
        res = super().train()
        return res if res is not None else getattr(self, "_last_eval_results", None)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        model = unwrap(self.model)
        if hasattr(model, "check_teacher_loaded"):
            model.check_teacher_loaded()


def evaluate_teacher(cfg, model):
    """COCO metrics of the distiller's teacher on ``cfg.DATASETS.TEST`` (any detector family).

    The test images are read in the teacher's INPUT.FORMAT, at the student's sizes.
    """
    teacher = unwrap(model).teacher
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
