#!/usr/bin/env python
"""Training-step benchmark: images/s, step time (mean, p90) and peak memory, on generated data.

Cases (see the README's Performance section):
  a  classification DKD, resnet32x4 -> resnet8x4, batch 64, 32x32 (the trainer's own step)
  b  classification KD, ResNet34 -> ResNet18, batch 32, 224x224
  c  detection RCNNKD ReviewKD, Faster R-CNN R-101 -> R-18 FPN, batch 2, 320x480
  d  detection ReviewKD, RetinaNet R-101 -> R-18 FPN, batch 2, 320x480

Prints one JSON line per case and writes ``<out>/benchmark_<device>.json`` and a
PNG plot next to it. Data is generated in each dataset's real on-disk format
(CIFAR-100 python pickles, an ImageFolder tree of JPEGs, detectron2 input
dicts), so no dataset is needed. The cases live in ``tools/bench``. Examples::

    python tools/benchmark.py --device cpu
    python tools/benchmark.py --device cpu --case a --mdistiller ../mdistiller --rounds 6
    python tools/benchmark.py --device cpu --case a --teacher-cache warm --mdistiller ../mdistiller
    python tools/benchmark.py --device cuda --case a --loader-only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:  # loaded by file path (the tests) rather than run as a script
    sys.path.insert(0, TOOLS)
    try:
        import bench
    finally:  # once imported, the package finds its modules itself; keep tools/ off the path
        sys.path.remove(TOOLS)
else:
    import bench
from bench.cls_cases import run_classification
from bench.det_case import run_detection
from bench.measure import summarize  # noqa: F401  (part of this module's API)
from bench.plot import plot

REPO = bench.REPO
CASES = bench.CASES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--case", nargs="+", default=["all"], help="a, b, c, d or all")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default per case and device)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default per case and device)")
    p.add_argument("--batch-size", type=int, default=None, help="override every case's batch size")
    p.add_argument("--image-size", default=None, help="override the input size of cases b, c and d: N or HxW")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=None, help="loader worker processes (default: the config's)")
    p.add_argument("--loader-only", action="store_true", help="time the data loaders only")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-path comparison of case a")
    p.add_argument("--path", choices=("fast", "plain"), default="fast",
                   help="fast: the config's defaults; plain: no BN folding, channels_last, AMP or compile")
    p.add_argument("--no-mem-probe", action="store_true",
                   help="CPU: report peak memory from the timed process instead of a separate probe")
    # Internal: a memory-probe child run (bench.measure.run_child).
    p.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mdistiller", default="", help="path of an mdistiller checkout to compare case a with")
    p.add_argument("--rounds", type=int, default=4, help="alternating ours/mdistiller rounds of --steps steps")
    p.add_argument("--mdistiller-layout", choices=("native", "ours"), default="native",
                   help="memory layout of mdistiller's batch: native = contiguous NCHW, as its own loader "
                        "(ToTensor, Normalize, default collate) yields; ours = the NHWC batch our loader yields")
    p.add_argument("--teacher-cache", choices=("off", "cold", "warm"), default="off",
                   help="case a's teacher-logit cache (docs/teacher_cache.md). off: the teacher runs every step; "
                        "cold: every timed step misses (its entries are cleared first), runs the teacher and writes "
                        "back; warm: the timed batch's entries are filled first (untimed), so no step runs the teacher")
    p.add_argument("--det-opts", nargs="*", default=[], help="extra detectron2 KEY VALUE overrides for cases c and d")
    p.add_argument("--det-methods", nargs="*", default=[],
                   help="cases c and d: also time what each named KD method adds to the step, against a no-op "
                        "method with the same needs ('all': every method the case's families serve)")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG results")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    args = p.parse_args(argv)
    cases = CASES if "all" in args.case else tuple(args.case)
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown case {bad[0]!r}; valid: {', '.join(CASES)}, all")
    args.cases = cases
    if args.teacher_cache != "off" and set(cases) != {"a"}:
        p.error(f"--teacher-cache {args.teacher_cache} works with --case a only (the one finite augmentation)")
    if args.image_size:
        try:
            hw = [int(v) for v in str(args.image_size).lower().split("x")]
        except ValueError:
            hw = []
        if len(hw) not in (1, 2) or min(hw) < 1:
            p.error(f"--image-size {args.image_size!r}: expected N or HxW, e.g. 32 or 320x480")
        args.image_hw = (hw[0], hw[-1])
    else:
        args.image_hw = None
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device {args.device!r}: valid choices are cpu, cuda, cuda:N")
    return args


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    if args.device == "cpu":  # keep the trainer, which picks CUDA when present, on the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu")
        torch.cuda.set_device(torch.device(args.device))
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}"
                          if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} threads")
    results = []
    for case in args.cases:
        with tempfile.TemporaryDirectory(prefix="kd_bench_") as tmp:
            if case in ("c", "d"):
                r = run_detection(case, args, device, tmp)
            else:
                r = run_classification(case, args, device, tmp)
        r.update(machine=machine, threads=torch.get_num_threads(), torch=torch.__version__)
        print(json.dumps(r), flush=True)
        results.append(r)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"benchmark_{device.type}" + ("_plain" if args.path == "plain" else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"command": "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "results": results}, f, indent=1)
    if not args.no_plot:
        plot(results, stem + ".png")
    return results


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
