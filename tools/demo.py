"""The quick-start demo on the embedded ``digits`` dataset (``make demo``).

1. trains a teacher (resnet20) from scratch;
2. trains a student (resnet8) three ways: alone (vanilla), with KD, with DKD;
3. prints top-1 accuracy and wall time of each run.

Everything runs through the real trainer and config machinery, as
``tools/train.py`` would, and writes its runs under ``--out``
(``./demo_output``). A few minutes on 2 CPU cores; ``--long`` trains longer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def digits_cfg(out: str, name: str, method: str, teacher: str, student: str, epochs: int, extra=(),
               batch_size: int = 64):
    from kd_cls.engine import get_cfg

    cfg = get_cfg()
    stages = [max(1, int(epochs * 0.6)), max(1, int(epochs * 0.85))]
    cfg.merge_from_list([
        "EXPERIMENT.PROJECT", "digits_demo",
        "EXPERIMENT.NAME", name,
        "EXPERIMENT.TAG", f"{method.lower()},{teacher},{student}",
        "DATASET.TYPE", "digits",
        "DATASET.TEST.BATCH_SIZE", 360,
        "DISTILLER.TYPE", method,
        "DISTILLER.TEACHER", teacher,
        "DISTILLER.STUDENT", student,
        "SOLVER.EPOCHS", epochs,
        "SOLVER.BATCH_SIZE", batch_size,
        "SOLVER.LR", 0.05,
        "SOLVER.LR_DECAY_STAGES", stages,
        "SOLVER.WEIGHT_DECAY", 5e-4,
        "LOG.PREFIX", out,
        "LOG.SAVE_CHECKPOINT_FREQ", 0,
        "LOG.EVAL_TEACHER", False,
        *extra,
    ])
    cfg.freeze()
    return cfg


def run(cfg, label: str):
    from kd_cls.engine.launch import train_from_cfg

    print(f"\n=== {label} ===", flush=True)
    t0 = time.perf_counter()
    trainer = train_from_cfg(cfg)
    return trainer, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser("tools/demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="./demo_output", help="LOG.PREFIX of the demo's runs")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--long", action="store_true", help="train 4x longer (closer to converged; ~4x the time)")
    args = p.parse_args(argv)
    te, se = args.teacher_epochs, args.student_epochs
    if args.long:
        te, se = 4 * te, 4 * se
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    total0 = time.perf_counter()
    print(f"digits demo: teacher {args.teacher} ({te} epochs), student {args.student} ({se} epochs) x 3 methods; "
          f"runs under {os.path.abspath(args.out)}", flush=True)
    teacher_cfg = digits_cfg(args.out, f"teacher_{args.teacher}", "NONE", args.teacher, args.teacher, te)
    trainer, t = run(teacher_cfg, f"1/4 teacher {args.teacher} (vanilla)")
    teacher_ckpt = os.path.join(trainer.log_path, "student_best")
    rows = [("teacher", args.teacher, "vanilla", trainer.best_acc, t)]

    # Students use batch 32: twice the steps per epoch, which the small resnet8 needs in a short run.
    # DKD's warm-up is 20 of 240 epochs in the paper; keep that fraction of a short run.
    warm = max(1, round(se * 20 / 240))
    methods = [
        ("vanilla", "NONE", ()),
        ("KD", "KD", ()),
        ("DKD", "DKD", ("DKD.WARMUP", warm)),
    ]
    for i, (label, method, extra) in enumerate(methods, start=2):
        cfg = digits_cfg(args.out, f"student_{args.student}_{label.lower()}", method, args.teacher, args.student, se,
                         ("DISTILLER.TEACHER_WEIGHTS", teacher_ckpt, *extra), batch_size=32)
        trainer, t = run(cfg, f"{i}/4 student {args.student} ({label})")
        rows.append(("student", args.student, label, trainer.best_acc, t))

    print("\nDigits (sklearn, 1,437 train / 360 test images, 32x32): best top-1 on the test split")
    print(f"| {'run':8} | {'model':10} | {'method':8} | {'top-1 (%)':>9} | {'time (s)':>8} |")
    print(f"|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for role, model, method, acc, t in rows:
        print(f"| {role:8} | {model:10} | {method:8} | {acc:9.2f} | {t:8.1f} |")
    print(f"total {time.perf_counter() - total0:.0f} s; checkpoints and logs under {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    from kd_cls.engine.cli import USER_ERRORS

    try:
        sys.exit(main())
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
