"""Command lines of ``tools/train.py`` and ``tools/eval.py`` (mdistiller's arguments), and ``tools/cache_teacher.py``.

Expected failures (a bad name, a config typo, a missing file, an unusable
checkpoint, a NaN loss) end with one ``error: ...`` line on stderr and exit
status 2, before any run directory is created where possible.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from kd_cls.checkpoint_io import CheckpointError
from kd_cls.config import CfgNode, ConfigError
from kd_cls.data import DATASETS
from kd_cls.nn.teacher_cache import human_bytes
from kd_cls.registry import UnknownNameError

from .checkpoint import ResumeError
from .defaults import get_cfg
from .distributed import is_main
from .hooks import NonFiniteLossError
from .launch import build_run, evaluate_checkpoint
from .logger import log_msg
from .teacher_cache import fill_from_cfg

__all__ = ["train_main", "eval_main", "cache_main", "USER_ERRORS"]

USER_ERRORS = (ConfigError, UnknownNameError, FileNotFoundError, CheckpointError, ResumeError,
               NonFiniteLossError, ValueError)


def _fail(e: BaseException) -> int:
    msg = str(e).strip().replace("\n", " ") or type(e).__name__
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def show_cfg(cfg) -> str:
    """The config nodes a run uses (mdistiller's ``show_cfg``): the base nodes and the method's own."""
    view = CfgNode()
    for key in ("EXPERIMENT", "DATASET", "DISTILLER", "SOLVER", "LOG"):
        view[key] = cfg[key]
    if cfg.DISTILLER.TYPE in cfg:
        view[cfg.DISTILLER.TYPE] = cfg[cfg.DISTILLER.TYPE]
    return view.dump()


def load_cfg(cfg_file: str, opts: List[str]):
    cfg = get_cfg()
    if cfg_file:
        cfg.merge_from_file(cfg_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


TRAIN_EXAMPLES = """examples:
  python3 tools/train.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml
  python3 tools/train.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml SOLVER.BATCH_SIZE 128 SOLVER.LR 0.1
  python3 tools/train.py --cfg configs/cifar100/vanilla.yaml DATASET.TYPE digits SOLVER.EPOCHS 1 --resume
  torchrun --nproc_per_node 2 tools/train.py --cfg configs/cifar100/kd.yaml   (DDP)

--resume continues a run from its 'latest' checkpoint (the same config and overrides; LOG.* and
SOLVER.EPOCHS may change, so SOLVER.EPOCHS N extends a finished run)."""


def _split_resume(opts: List[str]):
    """``--resume`` may stand before or after the ``KEY VALUE`` overrides."""
    rest = [o for o in opts if o != "--resume"]
    return rest, len(rest) != len(opts)


def train_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools/train.py", description="Train a student, with or without a teacher "
                                     "(mdistiller's command line).", epilog=TRAIN_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", type=str, default="", help="config file (mdistiller's schema, _BASE_ allowed)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its 'latest' checkpoint")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    opts, resume_after = _split_resume(args.opts or [])
    resume = args.resume or resume_after
    trainer = None
    try:
        cfg = load_cfg(args.cfg, opts)
        trainer = build_run(cfg, opts, resume=resume)
        if is_main():
            print(log_msg("CONFIG:\n" + show_cfg(cfg)), flush=True)
            print(log_msg(f"run directory: {trainer.log_path}"), flush=True)
        trainer.train(resume=resume)
    except USER_ERRORS as e:
        return _fail(e)
    except KeyboardInterrupt:
        return _interrupted(trainer)
    return 0


def _interrupted(trainer) -> int:
    if trainer is None:
        where = "before the run started; nothing was written"
    else:
        latest = os.path.join(trainer.log_path, "latest")
        done = f"the last completed epoch's checkpoint is {latest}" if os.path.isfile(latest) \
            else "no epoch had completed"
        where = f"at epoch {trainer.epoch}; {done}; continue with --resume"
    print(f"error: interrupted {where}", file=sys.stderr, flush=True)
    return 130


EVAL_EXAMPLES = """examples:
  python3 tools/eval.py -m resnet32x4                                  (the released teacher)
  python3 tools/eval.py -m resnet8x4 -c download_ckpts/dkd_resnet8x4     (a released DKD student)
  python3 tools/eval.py -m resnet8 -c output/<project>/<run>/student_best -d digits"""


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools/eval.py", description="Top-1/top-5 accuracy and loss of a zoo model on a "
                                     "validation set.", epilog=EVAL_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=str, required=True, help="zoo model name, e.g. resnet8x4")
    parser.add_argument("-c", "--ckpt", type=str, default="pretrain",
                        help="checkpoint file ({'model': state_dict}, a student_* or full-state file); "
                             "'pretrain' (default) takes the model's released teacher checkpoint")
    parser.add_argument("-d", "--dataset", type=str, default="cifar100", choices=DATASETS.names(),
                        help="validation set (default cifar100)")
    parser.add_argument("-bs", "--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    args = parser.parse_args(argv)
    try:
        top1, top5, loss = evaluate_checkpoint(args.model, args.ckpt, args.dataset, args.batch_size)
    except USER_ERRORS as e:
        return _fail(e)
    print(f"top-1 {top1:.2f} top-5 {top5:.2f} loss {loss:.4f}", flush=True)
    return 0


CACHE_EXAMPLES = """examples:
  python3 tools/cache_teacher.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml SOLVER.TEACHER_CACHE ./teacher_cache
  python3 tools/cache_teacher.py --cfg configs/cifar100/kd.yaml SOLVER.TEACHER_CACHE ./teacher_cache --batch-size 4096
  python3 tools/train.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml SOLVER.TEACHER_CACHE ./teacher_cache

The cache is keyed by the teacher's weights, the data and the transform: every method and
student that shares them reads the same file. A killed fill resumes where it stopped when the
same command runs again. See docs/teacher_cache.md."""


def cache_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        "tools/cache_teacher.py", epilog=CACHE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fill the teacher-logit cache of a config (SOLVER.TEACHER_CACHE): the teacher's logits for "
                    "every (training image, augmentation view), computed once in inference mode with BatchNorm "
                    "folded, so that later KD and DKD runs with the same teacher skip its forward pass.")
    parser.add_argument("--cfg", type=str, default="", help="config file of a KD or DKD run (mdistiller's schema)")
    parser.add_argument("--batch-size", type=int, default=1024, help="images per teacher forward pass (default 1024)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides, e.g. SOLVER.TEACHER_CACHE ./teacher_cache")
    args = parser.parse_args(argv)
    try:
        out = fill_from_cfg(load_cfg(args.cfg, args.opts or []), args.batch_size, not args.no_progress)
    except USER_ERRORS as e:
        return _fail(e)
    rate = out["filled_now"] / out["seconds"] if out["seconds"] > 0 else 0.0
    print(f"filled {out['filled_now']} entries in {out['seconds']:.1f} s ({rate:.0f} entries/s); "
          f"{out['filled']} of {out['rows']} entries are filled", flush=True)
    print(f"cache file {out['path']}: {human_bytes(out['size'])} ({out['size']} bytes)", flush=True)
    return 0
