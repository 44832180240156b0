#!/usr/bin/env python
"""Detection demo: distill a small detector with ReviewKD on a generated shapes dataset.

1. writes a COCO-format shapes dataset (96 px images by default) to ``--out``/data;
2. trains a ResNet-18-FPN Faster R-CNN teacher from scratch;
3. trains a MobileNetV2-FPN student with ReviewKD from that teacher;
4. trains the same student without KD;
5. prints COCO box AP (pycocotools) on the val split for all three.

Everything trains from scratch on the CPU: BatchNorm in train mode, nothing
frozen, small anchors for small images. The default budget takes a few minutes
on 2 cores; ``--long`` trains 3x longer (higher APs).
"""
import argparse
import contextlib
import logging
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# detectron2 0.6 on a current torch: deprecation notices that say nothing about the demo.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="torch.meshgrid")

import torch  # noqa: E402

import kd_det  # noqa: E402,F401
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from kd_det.config import get_kd_cfg  # noqa: E402
from kd_det.data import register_shapes  # noqa: E402
from kd_det.data.shapes import make_shapes_dataset  # noqa: E402
from kd_det.engine import KDTrainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG_DIR = os.path.join(REPO, "configs", "detection")

# Shared by teacher and students: tiny inputs, few proposals, small anchors, training from scratch.
COMMON = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.MOBILENETV2.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "128",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
    "INPUT.RANDOM_FLIP", "horizontal",
    "DATASETS.TRAIN", "('shapes_train',)",
    "DATASETS.TEST", "('shapes_val',)",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.BASE_LR", "0.02",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    "TEST.EVAL_PERIOD", "0",
    "SEED", "0",
]


def _schedule(iters):
    warmup = min(50, max(1, iters // 5))
    return [
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.8)},)" if iters >= 5 else "()",
        "SOLVER.WARMUP_ITERS", str(warmup),
    ]


def _input(size):
    return [
        "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(size),
        "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size),
    ]


def train_and_eval(cfg, quiet=True):
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    seed_all_rng(cfg.SEED)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    # Training ends with a COCO evaluation of DATASETS.TEST; pycocotools prints its tables.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
        trainer.train()
    res = trainer._last_eval_results
    res = res.get(cfg.DATASETS.TEST[0], res)  # detectron2 flattens a single dataset's results
    return res["bbox"]["AP"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output/detection", help="data, checkpoints and logs go here")
    p.add_argument("--long", action="store_true", help="train 3x longer")
    p.add_argument("--teacher-iters", type=int, default=None)
    p.add_argument("--student-iters", type=int, default=None)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=100)
    # One thread: on a shared machine two intra-op threads can be many times slower than one.
    p.add_argument("--threads", type=int, default=int(os.environ.get("KD_THREADS", "1")))
    p.add_argument("--verbose", action="store_true", help="print detectron2's training log")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    scale = 3 if a.long else 1
    t_iters = a.teacher_iters or 300 * scale
    s_iters = a.student_iters or 200 * scale

    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    for name in ("detectron2", "fvcore", "kd_det"):
        logger = setup_logger(output=os.path.join(out, "log.txt"), name=name)
        for h in logger.handlers:  # the full log goes to the file; the console gets warnings only
            if getattr(h, "stream", None) is sys.stdout and not a.verbose:
                h.setLevel(logging.WARNING)
    root = os.path.abspath(os.path.join(a.out, "data"))
    t0 = time.time()
    make_shapes_dataset(root, a.num_train, a.num_val, image_size=a.image_size, categories="shapes")
    register_shapes(root)

    size = _input(a.image_size)
    teacher_cfg = get_kd_cfg(
        os.path.join(CFG_DIR, "COCO-Detection", "faster_rcnn_R_18_FPN_3x.yaml"),
        COMMON + size + _schedule(t_iters) + ["OUTPUT_DIR", os.path.join(out, "teacher")],
    )
    print(f"[demo_det] training teacher (ResNet-18-FPN, {t_iters} iters) ...", flush=True)
    ap_teacher = train_and_eval(teacher_cfg, not a.verbose)
    print(f"[demo_det] teacher box AP {ap_teacher:.1f}  ({time.time() - t0:.0f}s)", flush=True)

    student_file = os.path.join(CFG_DIR, "COCO-Detection", "faster_rcnn_MV2_FPN_3x.yaml")
    student_opts = COMMON + size + _schedule(s_iters) + ["MODEL.MOBILENETV2.WIDTH_MULT", "0.5"]
    kd_opts = student_opts + [
        "MODEL.META_ARCHITECTURE", "RCNNKD",
        "KD.TYPE", "ReviewKD",
        "KD.REVIEWKD.LOSS_WEIGHT", "1.0",
        "TEACHER.CONFIG_FILE", os.path.join(out, "teacher", "config.yaml"),
        "TEACHER.MODEL.WEIGHTS", os.path.join(out, "teacher", "model_final.pth"),
        "OUTPUT_DIR", os.path.join(out, "student_reviewkd"),
    ]
    print(f"[demo_det] training MobileNetV2-FPN student with ReviewKD ({s_iters} iters) ...", flush=True)
    ap_kd = train_and_eval(get_kd_cfg(student_file, kd_opts), not a.verbose)
    print(f"[demo_det] student+ReviewKD box AP {ap_kd:.1f}  ({time.time() - t0:.0f}s)", flush=True)

    print(f"[demo_det] training the same student without KD ({s_iters} iters) ...", flush=True)
    ap_plain = train_and_eval(
        get_kd_cfg(student_file, student_opts + ["OUTPUT_DIR", os.path.join(out, "student")]), not a.verbose
    )

    print("\nCOCO box AP on shapes_val:")
    print(f"  teacher  (R-18-FPN)            {ap_teacher:5.1f}")
    print(f"  student  (MV2-FPN) + ReviewKD  {ap_kd:5.1f}")
    print(f"  student  (MV2-FPN), no KD      {ap_plain:5.1f}")
    if not a.long:
        print("(200 iterations from scratch: a student's AP moves by 10 points or more between runs that differ "
              "only in float rounding, so this run checks the pipeline, not the KD gain; --long trains 3x longer)")
    print(f"total {time.time() - t0:.0f}s; outputs in {out}")
    return {"teacher": ap_teacher, "student_kd": ap_kd, "student": ap_plain}


if __name__ == "__main__":
    main()
