"""Cases a and b: the classification trainer's own training step on generated data.

a  DKD, resnet32x4 -> resnet8x4 on CIFAR-100 pickles, 32x32;
b  KD, ResNet34 -> ResNet18 on an ImageFolder tree of 500x375 JPEGs, 224x224.

Case a can run with the teacher-logit cache (``--teacher-cache cold|warm``);
the timed steps then all use one batch, whose entries are cleared before each
step (cold) or filled once before timing (warm).
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

from . import DEFAULT_BATCH, REPO, case_steps
from .measure import measure, run_child, sync, time_loader

# Case b's ImageFolder tree: 4 classes, at least max(16, 8 batches) training and 8 validation images.
B_CLASSES = 4
B_SIZE = (500, 375)  # (w, h), a typical ImageNet photo


def _cls_cfg(config_file: str, batch: int, tmp: str, workers: Optional[int], fast: bool):
    from kd_cls.engine import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, config_file))
    cfg.SOLVER.BATCH_SIZE = batch
    cfg.DATASET.ROOT = tmp
    cfg.LOG.PREFIX = os.path.join(tmp, "runs")
    cfg.LOG.WANDB = False
    if workers is not None:
        cfg.DATASET.NUM_WORKERS = workers
    if not fast:
        cfg.SOLVER.FOLD_TEACHER_BN = False
        cfg.SOLVER.CHANNELS_LAST = False
        cfg.SOLVER.AMP = ""
        cfg.SOLVER.COMPILE = False
    return cfg


def _build_trainer(cfg, tag: str, state=None):
    import torch

    from kd_cls.data.registry import get_dataset_info
    from kd_cls.distillers.base import build_distiller
    from kd_cls.engine.trainers import get_trainer
    from kd_cls.models.registry import build_model

    info = get_dataset_info(cfg.DATASET.TYPE)
    torch.manual_seed(0)
    teacher = build_model(cfg.DISTILLER.TEACHER, info.num_classes, cfg.DATASET.TYPE)
    student = build_model(cfg.DISTILLER.STUDENT, info.num_classes, cfg.DATASET.TYPE)
    distiller = build_distiller(cfg, student, teacher, num_data=info.num_train)
    if state is not None:
        distiller.load_state_dict(state)
    trainer = get_trainer(cfg.SOLVER.TRAINER)(f"bench_{tag}", distiller, None, None, cfg)
    trainer.distiller.train()
    return trainer


def _resize_batch(batch, hw):
    import torch.nn.functional as F

    if hw is None or tuple(batch[0].shape[-2:]) == tuple(hw):
        return batch
    return (F.interpolate(batch[0], size=hw, mode="bilinear", align_corners=False),) + tuple(batch[1:])


def _write_data(case: str, tmp: str, batch: int) -> str:
    """Generate the case's dataset under ``tmp``; returns the config file of the case."""
    from kd_cls.testing import make_imagenet_tree, write_cifar100

    if case == "a":
        write_cifar100(tmp, n_train=max(1024, batch * 8), n_test=256)
        return "configs/cifar100/dkd/res32x4_res8x4.yaml"
    n_train, n_val = max(16, batch * 8), 8
    make_imagenet_tree(tmp, classes=B_CLASSES, per_class=-(-n_train // B_CLASSES),
                       val_per_class=-(-n_val // B_CLASSES), size=B_SIZE)
    return "configs/imagenet/r34_r18/kd.yaml"


def _teacher_copy_stats(distiller) -> Dict:
    """Size and folded BatchNorms of the teacher's inference copy, when it runs through one."""
    frozen = distiller.frozen_teacher
    if frozen is None or not frozen.uses_copy:
        return {}
    # The steps built it (same teacher state: this returns that copy); it was resident before
    # the timed steps, so it is not in peak_mem_mb.
    copy_ = frozen.inference_module("")
    nbytes = sum(t.numel() * t.element_size() for t in copy_.state_dict().values())
    return {"teacher_copy_mb": round(nbytes / 2**20, 1), "folded_bns": len(getattr(copy_, "folded_pairs", {}))}


def _attach_cache(cfg, trainer, train_loader, first, mode: str, tmp: str):
    """Give the trainer a teacher cache in ``tmp``; returns the hook each cold step runs first (or None)."""
    import torch

    from kd_cls.engine.teacher_cache import attach_teacher_cache

    cfg = cfg.clone()
    cfg.SOLVER.TEACHER_CACHE = os.path.join(tmp, "teacher_cache")
    cache = attach_teacher_cache(cfg, trainer.distiller, train_loader)
    if mode == "cold":
        return lambda: cache.forget(first.index, first.view)
    image = trainer.unpack(first)[0]  # warm: the timed batch's entries, computed as a step would
    with torch.no_grad(), trainer.autocast():
        logits, _ = trainer.distiller.frozen_teacher.run(image)
    cache.store(first.index, first.view, logits)
    cache.commit()
    return None


def run_classification(case: str, args, device, tmp: str) -> Dict:
    from kd_cls.data.registry import get_dataset_info

    warmup, steps = case_steps(case, args, device)
    batch = args.batch_size or DEFAULT_BATCH[case]
    hw = args.image_hw if (args.image_hw and case != "a") else None  # CIFAR models are 32x32 only
    config_file = _write_data(case, tmp, batch)
    cfg = _cls_cfg(config_file, batch, tmp, args.workers, fast=args.path == "fast")
    info = get_dataset_info(cfg.DATASET.TYPE)
    cache_mode = getattr(args, "teacher_cache", "off")
    out: Dict = {"case": case, "device": device.type, "path": args.path, "method": cfg.DISTILLER.TYPE,
                 "teacher": cfg.DISTILLER.TEACHER, "student": cfg.DISTILLER.STUDENT, "batch_size": batch,
                 "teacher_cache": cache_mode}
    train_loader = info.build(cfg)[0]
    n_loader = max(2, len(train_loader) - 1)  # every batch but the first: prefetching has drained
    out["loader_images_per_s"] = None if args._probe else time_loader(train_loader, n_loader, device)
    if case == "a" and not args._probe:  # the reference per-image PIL pipeline, for comparison
        cfg_pil = cfg.clone()
        cfg_pil.DATASET.BATCH_AUG = False
        out["loader_pil_images_per_s"] = time_loader(info.build(cfg_pil)[0], n_loader, device)
    train_loader.with_view = cache_mode != "off"  # the timed batch then carries its views
    first = _resize_batch(next(iter(train_loader)), hw)
    out["image_size"] = list(first[0].shape[-2:])
    if args.loader_only:
        out.update(images_per_s=out["loader_images_per_s"], step_ms_mean=None, step_ms_p90=None, peak_mem_mb=None)
        return out

    trainer = _build_trainer(cfg, case)
    before = _attach_cache(cfg, trainer, train_loader, first, cache_mode, tmp) if cache_mode != "off" else None

    def step():
        if before is not None:
            before()
        return trainer.train_step(first, 1)

    out.update(measure(step, warmup, steps, batch, device))
    out.update(warmup=warmup, steps=steps, fold_teacher_bn=bool(cfg.SOLVER.FOLD_TEACHER_BN),
               channels_last=bool(trainer.channels_last), amp=str(cfg.SOLVER.AMP), compile=bool(cfg.SOLVER.COMPILE))
    out.update(_teacher_copy_stats(trainer.distiller))
    if args._probe:
        return out
    if device.type == "cpu" and not args.no_mem_probe:
        out["peak_mem_mb"] = run_child(args, case, args.path, probe=True)["peak_mem_mb"]
    if hw is None and cache_mode == "off":  # the whole loop, loader included (its batches would miss)
        def loop():
            n = 0
            for b in train_loader:
                trainer.train_step(b, 1)
                n += b[0].shape[0]
                if n >= batch * steps:
                    break
            return n

        sync(device)
        t0 = time.perf_counter()
        n = loop()
        sync(device)
        out["images_per_s_with_loader"] = round(n / (time.perf_counter() - t0), 2)

    if case == "a" and not args.no_plain and args.path == "fast":
        res = run_child(args, "a", "plain", probe=False)
        for k in ("images_per_s", "step_ms_mean", "step_ms_p90", "peak_mem_mb"):
            out[f"plain_{k}"] = res[k]
        out["speedup_vs_plain"] = round(out["images_per_s"] / res["images_per_s"], 3)
        if device.type == "cpu" and not args.no_mem_probe:
            out["plain_peak_mem_mb"] = run_child(args, "a", "plain", probe=True)["peak_mem_mb"]
    if case == "a" and args.mdistiller:
        from .mdistiller import compare_mdistiller

        out.update(compare_mdistiller(args, trainer, first, cfg, warmup, steps, device, before_step=before))
    return out
