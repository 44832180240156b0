#!/usr/bin/env python
"""Detection demo: distill a small Faster R-CNN on generated shapes, over seeds, on the CPU.

1. writes a COCO-format shapes dataset (64 px images) to DIR/det/data;
2. trains a ResNet-18-FPN Faster R-CNN teacher from scratch for 800 iterations, once: it is
   cached in DIR/det/teachers with a hash of its config and data, and reused while both hold;
3. for each seed, trains a MobileNetV2-x0.5-FPN Faster R-CNN student for 300 iterations, alone
   (vanilla) and with each method of --methods (default CWD, channel-wise distillation of the
   FPN maps, with its published keys); a distilled student starts from the teacher's RPN and
   box head (KD.INHERIT ["head"], the inheriting step of the FGD and MGD recipes);
4. writes DIR/results.json (one row per run: COCO box AP on the val split), DIR/demo_det.png
   (mean ± std per method) and prints the table: mean ± std, the paired gain over vanilla ±
   the standard error of the per-seed differences, the number of seeds.

The student trains far shorter than the teacher: the demo asks what distillation buys a small
detector on a short budget. Seeds: the teacher trains with --first-seed, student run k of each
method with --first-seed + k. The defaults were chosen on seeds 100-102; docs/demos.md holds
that log, including what the inherited head alone and the CWD loss alone give.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
for _p in (REPO, TOOLS):
    if _p not in sys.path:
        sys.path.insert(0, _p)
# detectron2 0.6 on a current torch: deprecation notices that say nothing about the demo.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)

CFG_DIR = os.path.join(REPO, "configs", "detection", "COCO-Detection")
EXAMPLES = """examples:
  python tools/demo_det.py                              # the default run (make demo): seeds 0-2
  python tools/demo_det.py --seeds 5 --methods CWD DKD  # seeds 0-4, two methods
  python tools/demo_det.py --first-seed 100 --methods CWD FGD --inherit none   # as in the selection
"""
DEFAULTS = dict(seeds=3, teacher_iters=800, student_iters=300, image_size=64, num_train=400, num_val=300,
                methods=["CWD"], inherit="head")

# Shared by every detector of every family: tiny inputs, few proposals, small anchors, from scratch.
COMMON = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.MOBILENETV2.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "INPUT.RANDOM_FLIP", "horizontal",
    "DATASETS.TRAIN", "('shapes_train',)",
    "DATASETS.TEST", "('shapes_val',)",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.CHECKPOINT_PERIOD", "1000000",
    "TEST.EVAL_PERIOD", "0",
]
_RCNN = [
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300", "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "128", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
]
# Dense heads on p3-p6 on both sides: the MobileNetV2 FPN has no p7, and CrossKD decodes the
# teacher's regressions on the student's anchors, so both anchor generators must be the same.
_DENSE_ANCHORS = ["MODEL.ANCHOR_GENERATOR.SIZES", "[[8, 10, 13], [16, 20, 25], [32, 40, 50], [64, 80, 101]]"]
_MV2 = ["MODEL.MOBILENETV2.WIDTH_MULT", "0.5"]
_MV2_FPN = ["MODEL.BACKBONE.NAME", "build_mobilenetv2_fpn_backbone",
            "MODEL.MOBILENETV2.OUT_FEATURES", "['m2', 'm3', 'm4', 'm5']",
            "MODEL.FPN.IN_FEATURES", "['m2', 'm3', 'm4', 'm5']"] + _MV2
# Per family: the shared options, the base LR, and (config file, extra options, short name) of
# the teacher and of the student. Teacher and student are of one family, so KD.INHERIT applies.
FAMILIES = {
    "rcnn": dict(common=_RCNN + ["MODEL.ROI_HEADS.NUM_CLASSES", "3"], lr=0.02,
                 teacher=("faster_rcnn_R_18_FPN_3x.yaml", [], "R18-FPN FRCNN"),
                 student=("faster_rcnn_MV2_FPN_3x.yaml", _MV2, "MV2x0.5-FPN FRCNN")),
    # Per-level BN in the RetinaNet head: without a norm, a teacher from scratch reached 0.9 box AP
    # in 800 iterations at LR 0.01 (0.0 at LR 0.02); with it, 15 AP in 400 iterations at LR 0.01.
    "retinanet": dict(common=_DENSE_ANCHORS + ["MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.RETINANET.NORM", "BN",
                                               "MODEL.RETINANET.IN_FEATURES", "['p3', 'p4', 'p5', 'p6']"], lr=0.01,
                      teacher=("retinanet_R_18_FPN_3x.yaml", [], "R18-FPN RetinaNet"),
                      student=("retinanet_R_18_FPN_3x.yaml", _MV2_FPN, "MV2x0.5-FPN RetinaNet")),
    "fcos": dict(common=["MODEL.FCOS.NUM_CLASSES", "3", "MODEL.FCOS.IN_FEATURES", "['p3', 'p4', 'p5', 'p6']"],
                 lr=0.01,
                 teacher=("fcos_R_18_FPN_1x.yaml", [], "R18-FPN FCOS"),
                 student=("fcos_R_18_FPN_1x.yaml", _MV2_FPN, "MV2x0.5-FPN FCOS")),
}
# The student's backbone differs from the teacher's, so their FPN lateral convs differ: no "neck".
INHERIT = {"none": [], "head": ["head"]}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, before anything is written
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def build_parser(prog="tools/demo_det.py", description=__doc__, epilog=EXAMPLES, defaults=DEFAULTS):
    d = defaults
    p = _Parser(prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=d["seeds"], help=f"student seeds per method (default {d['seeds']})")
    p.add_argument("--first-seed", type=int, default=0, help="first seed; runs use S..S+N-1 (default 0)")
    p.add_argument("--out", default="./demo_output", help="output folder DIR (default ./demo_output); the runs go "
                   "to DIR/det, the results to DIR/results.json")
    p.add_argument("--methods", nargs="+", default=d["methods"], metavar="NAME",
                   help=f"KD.METHODS names, one student run each per seed (default {' '.join(d['methods'])})")
    p.add_argument("--inherit", choices=sorted(INHERIT), default=d["inherit"],
                   help=f"KD.INHERIT of the distilled students (default {d['inherit']})")
    p.add_argument("--teacher-iters", type=int, default=d["teacher_iters"],
                   help=f"teacher training iterations (default {d['teacher_iters']})")
    p.add_argument("--student-iters", type=int, default=d["student_iters"],
                   help=f"student training iterations, each run (default {d['student_iters']})")
    p.add_argument("--image-size", type=int, default=d["image_size"],
                   help=f"side of the generated images in pixels (default {d['image_size']})")
    p.add_argument("--num-train", type=int, default=d["num_train"],
                   help=f"training images (default {d['num_train']})")
    p.add_argument("--num-val", type=int, default=d["num_val"],
                   help=f"validation images, the box AP's test set (default {d['num_val']})")
    # One thread: these detectors run many small ops; two threads on 2 shared cores are often slower.
    p.add_argument("--threads", type=int, default=int(os.environ.get("KD_THREADS", "1")),
                   help="torch intra-op threads (default 1, or $KD_THREADS)")
    p.add_argument("--verbose", action="store_true", help="print detectron2's training log too")
    return p


FAMILY_STUDENTS = {"rcnn": "a Faster R-CNN", "retinanet": "a RetinaNet", "fcos": "an FCOS"}


def check_args(p, a, families=("rcnn",)):
    """One-line errors for bad values, before anything is written."""
    from kd_det.methods import KD_METHODS

    for name, low in (("seeds", 1), ("first_seed", 0), ("teacher_iters", 1), ("student_iters", 1),
                      ("image_size", 32), ("num_train", 1), ("num_val", 1), ("threads", 1)):
        if getattr(a, name) < low:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)} is too small; give {low} or more")
    known = sorted(KD_METHODS.names())
    for m in a.methods:
        if m not in known:
            p.error(f"unknown method {m!r}. Valid choices: {', '.join(known)}")
        fams = KD_METHODS.get(m).STUDENT_FAMILIES
        if fams is not None and not set(fams) & set(families):
            student = " or ".join(FAMILY_STUDENTS[f] for f in families)
            p.error(f"method {m} does not serve {student} student (it serves {', '.join(fams)})")
    if len(set(a.methods)) != len(a.methods) or "vanilla" in a.methods:
        p.error(f"--methods {' '.join(a.methods)}: give each method once (vanilla always runs)")
    out = os.path.abspath(a.out)
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        p.error(f"--out {a.out}: {parent} is a file, not a folder; choose another output folder")
    if not os.access(parent, os.W_OK):
        p.error(f"--out {a.out}: {parent} is not writable; choose a writable output folder")


def data_options(a) -> dict:
    return dict(num_train=a.num_train, num_val=a.num_val, image_size=a.image_size)


def prepare_data(det_dir: str, options: dict) -> str:
    """The shapes dataset of ``options``, generated once into its own folder, registered as shapes_train/val."""
    from kd_det.data import register_shapes
    from kd_det.data.shapes import make_shapes_dataset

    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.join(det_dir, "data", key)
    done = os.path.join(root, "options.json")
    if not os.path.isfile(done):
        o = dict(options)
        make_shapes_dataset(root, o.pop("num_train"), o.pop("num_val"), image_size=o.pop("image_size"),
                            categories="shapes", **o)
        with open(done, "w") as f:
            json.dump(options, f)
    register_shapes(root)
    return root


def schedule(iters: int, lr: float):
    warmup = min(100, max(1, iters // 5))
    steps = f"({int(iters * 0.8)},)" if iters >= 5 else "()"
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", str(warmup),
            "SOLVER.BASE_LR", str(lr)]


def input_size(size: int):
    return ["INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(size),
            "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size)]


def model_cfg(family: str, role: str, iters: int, a, seed: int, out_dir: str, extra=()):
    from kd_det.config import get_kd_cfg

    fam = FAMILIES[family]
    cfg_file, opts, _ = fam[role]
    return get_kd_cfg(os.path.join(CFG_DIR, cfg_file), COMMON + fam["common"] + input_size(a.image_size)
                      + schedule(iters, fam["lr"]) + list(opts) + list(extra)
                      + ["SEED", str(seed), "OUTPUT_DIR", out_dir])


def train_and_eval(cfg, verbose: bool = False) -> float:
    """Train ``cfg`` (a plain detector or a distiller); COCO box AP of the student on DATASETS.TEST."""
    from detectron2.utils.env import seed_all_rng

    from kd_det.engine import KDTrainer

    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    seed_all_rng(cfg.SEED)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    # Training ends with a COCO evaluation of DATASETS.TEST; pycocotools prints its tables.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if verbose else devnull):
        trainer.train()
    res = trainer._last_eval_results
    res = res.get(cfg.DATASETS.TEST[0], res)  # detectron2 flattens a single dataset's results
    ap = float(res["bbox"]["AP"])
    # detectron2 reports NaN when the model detects nothing at all; its average precision is 0.
    return 0.0 if math.isnan(ap) else ap


def cached_teacher(det_dir: str, family: str, a, seed: int, data_key: dict, log=print):
    """``(config.yaml, model_final.pth, box AP)`` of the family's teacher: trained once per config and data."""
    tmp = model_cfg(family, "teacher", a.teacher_iters, a, seed, "")
    digest = hashlib.sha256((tmp.dump() + json.dumps(data_key, sort_keys=True)).encode()).hexdigest()
    tdir = os.path.join(det_dir, "teachers", f"{family}-{digest[:12]}")
    info_file = os.path.join(tdir, "teacher.json")
    weights = os.path.join(tdir, "model_final.pth")
    if os.path.isfile(info_file) and os.path.isfile(weights):
        with open(info_file) as f:
            info = json.load(f)
        if info.get("config_hash") == digest:
            log(f"teacher {FAMILIES[family]['teacher'][2]}: cached in {tdir} (box AP {info['box_AP']:.2f})")
            return os.path.join(tdir, "config.yaml"), weights, info["box_AP"]
    log(f"training the teacher {FAMILIES[family]['teacher'][2]} ({a.teacher_iters} iterations) ...")
    t0 = time.time()
    ap = train_and_eval(model_cfg(family, "teacher", a.teacher_iters, a, seed, tdir), a.verbose)
    info = {"config_hash": digest, "box_AP": ap, "seconds": round(time.time() - t0, 1)}
    with open(info_file + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(info_file + ".tmp", info_file)  # written last: a teacher without it is retrained
    log(f"teacher box AP {ap:.2f} ({info['seconds']:.0f}s)")
    return os.path.join(tdir, "config.yaml"), weights, ap


def student_run(det_dir: str, family: str, method: str, seed: int, a, teacher, kd_opts=(), name=None):
    """Box AP of one student run: ``vanilla`` (alone) or distilled with ``method`` from ``teacher``."""
    extra = []
    if method != "vanilla":
        t_cfg, t_weights, _ = teacher
        extra = ["KD.METHODS", f"['{method}']", "KD.INHERIT", str(INHERIT[a.inherit]),
                 "TEACHER.CONFIG_FILE", t_cfg, "TEACHER.MODEL.WEIGHTS", t_weights] + list(kd_opts)
    out = os.path.join(det_dir, "runs", family, f"{name or method}-seed{seed}")
    return train_and_eval(model_cfg(family, "student", a.student_iters, a, seed, out, extra), a.verbose)


def setup_logs(det_dir: str, verbose: bool) -> None:
    from detectron2.utils.logger import setup_logger

    for name in ("detectron2", "fvcore", "kd_det"):
        logger = setup_logger(output=os.path.join(det_dir, "log.txt"), name=name)
        for h in logger.handlers:  # the full log goes to the file; the console gets warnings only
            if getattr(h, "stream", None) is sys.stdout and not verbose:
                h.setLevel(logging.WARNING)


def write_rows(out_dir: str, rows, metric: str = "box_AP") -> str:
    """DIR/results.json with these rows; rows of another metric (the classification demo's) are kept."""
    from demo_report import replace_rows

    return replace_rows(out_dir, rows, metric)


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    check_args(p, a)
    import torch

    import kd_det  # noqa: F401  (registers the backbones, FCOS and the methods)
    from demo_report import format_table, plot_results, summarize

    torch.set_num_threads(a.threads)
    out = os.path.abspath(a.out)
    det_dir = os.path.join(out, "det")
    os.makedirs(det_dir, exist_ok=True)
    setup_logs(det_dir, a.verbose)
    t0 = time.time()

    def log(msg):
        print(f"[demo_det {time.time() - t0:5.0f}s] {msg}", flush=True)

    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    fam = FAMILIES["rcnn"]
    log(f"teacher {fam['teacher'][2]} {a.teacher_iters} it.; student {fam['student'][2]} {a.student_iters} it., "
        f"vanilla and {', '.join(a.methods)} (KD.INHERIT {INHERIT[a.inherit]}), seeds {seeds[0]}-{seeds[-1]}; "
        f"{a.image_size} px, {a.num_train} train / {a.num_val} val images; runs in {det_dir}")
    options = data_options(a)
    prepare_data(det_dir, options)
    teacher = cached_teacher(det_dir, "rcnn", a, a.first_seed, options, log)
    rows = [dict(role="teacher", model=fam["teacher"][2], method="vanilla", seed=a.first_seed, metric="box_AP",
                 value=teacher[2])]
    for seed in seeds:
        for method in ["vanilla"] + a.methods:
            t1 = time.time()
            ap = student_run(det_dir, "rcnn", method, seed, a, teacher)
            rows.append(dict(role="student", model=fam["student"][2], method=method, seed=seed, metric="box_AP",
                             value=ap))
            write_rows(out, rows)  # after every run: an interrupted demo keeps what it trained
            log(f"seed {seed} {method:8s} box AP {ap:6.2f} ({time.time() - t1:.0f}s)")
    summary = summarize(rows)
    inherit = f", KD runs inherit the teacher's {a.inherit}" if INHERIT[a.inherit] else ""
    png = plot_results(summary, os.path.join(out, "demo_det.png"), "box_AP",
                       f"shapes val box AP, {len(seeds)} seeds; student {a.student_iters} it.{inherit}")
    print(f"\nCOCO box AP on shapes_val ({a.num_val} images), seeds {seeds[0]}-{seeds[-1]}; gain = mean of the "
          "per-seed differences from vanilla ± its standard error")
    print(format_table(summary, "box_AP"))
    print(f"total {time.time() - t0:.0f}s; {os.path.join(out, 'results.json')}, {png}")
    return rows


if __name__ == "__main__":
    main()
