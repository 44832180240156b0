#!/usr/bin/env python
"""Train or evaluate a detectron2 detector, with or without distillation.

Same command line as detectron2's tools/train_net.py. A distillation config names
the student (its _BASE_), the teacher (TEACHER.CONFIG_FILE) and KD.METHODS; any
detectron2 detector of any family works on either side (see docs/detection.md).

examples:
  python tools/train_net.py --config-file configs/detection/ReviewKD/ReviewKD-R18-R101.yaml \\
      --num-gpus 8 SOLVER.IMS_PER_BATCH 16
  python tools/train_net.py --config-file configs/detection/ReviewKD/ReviewKD-RetinaNet-R18-R101.yaml \\
      TEACHER.MODEL.WEIGHTS teacher.pkl --eval-teacher
  python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
  python tools/train_net.py --config-file ... --resume
  torchrun --nproc_per_node 2 tools/train_net.py --config-file ...   (CPU: gloo, one process per rank)
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kd_det  # noqa: E402,F401  (registers the distiller, FCOS, backbones, the _C placeholder if needed)
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402

from kd_det.checkpoint import KDCheckpointer  # noqa: E402
from kd_det.config import get_kd_cfg  # noqa: E402
from kd_det.data import register_config_datasets  # noqa: E402
from kd_det.engine import KDTrainer, evaluate_teacher, init_torchrun, unwrap  # noqa: E402
from kd_det.preflight import USER_ERRORS, check_detection_run  # noqa: E402


def setup(args):
    """The config, checked before detectron2's ``default_setup`` creates ``OUTPUT_DIR``."""
    cfg = get_kd_cfg(args.config_file, args.opts, freeze=False)
    register_config_datasets(cfg)
    cfg.freeze()
    check_detection_run(cfg, resume=args.resume, eval_only=args.eval_only)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = KDTrainer.build_model(cfg)
        KDCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = KDTrainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(KDTrainer.test_with_TTA(cfg, model))
        return res

    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.eval_teacher:
        if not hasattr(unwrap(trainer.model), "teacher"):
            raise SystemExit("error: --eval-teacher needs a distillation config (KD.METHODS, or RCNNKD)")
        res = evaluate_teacher(cfg, trainer.model)
        logging.getLogger("kd_det").info(f"teacher results: {res}")
    return trainer.train()


def build_parser():
    parser = default_argument_parser(epilog="examples:" + __doc__.split("examples:", 1)[1])
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--eval-teacher", action="store_true",
                        help="evaluate the teacher's COCO AP on DATASETS.TEST before training")
    return parser


def run(args) -> int:
    """``main`` through torchrun or detectron2's ``launch``; expected failures are one line (exit 2)."""
    try:
        if init_torchrun():  # started by torchrun: this process is one rank already
            main(args)
        else:
            launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,))
    except USER_ERRORS as e:
        print(f"error: {str(e).strip().replace(chr(10), ' ')}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the last periodic checkpoint in OUTPUT_DIR is intact; continue with --resume",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    sys.exit(run(args))
