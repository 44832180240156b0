#!/usr/bin/env python
"""Training-step benchmark: images/s, step time (mean, p90) and peak memory, on generated data.

Cases (see the README's Performance section):
  a  classification DKD, resnet32x4 -> resnet8x4, batch 64, 32x32 (the trainer's own step)
  b  classification KD, ResNet34 -> ResNet18, batch 32, 224x224
  c  detection RCNNKD ReviewKD, R-101 -> R-18 FPN, batch 2, 320x480

Prints one JSON line per case and writes ``<out>/benchmark_<device>.json`` and a
PNG plot next to it. Data is generated in each dataset's real on-disk format
(CIFAR-100 python pickles, an ImageFolder tree of JPEGs, detectron2 input
dicts), so no dataset is needed. Examples::

    python tools/benchmark.py --device cpu
    python tools/benchmark.py --device cpu --case a --mdistiller ../mdistiller --rounds 6
    python tools/benchmark.py --device cuda --case a --loader-only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("a", "b", "c")
# (warmup, steps) per case when not given: a CPU run of all three takes a few minutes.
DEFAULT_STEPS = {"cpu": {"a": (2, 10), "b": (1, 3), "c": (1, 3)}, "cuda": {"a": (10, 100), "b": (5, 30), "c": (5, 20)}}
DEFAULT_BATCH = {"a": 64, "b": 32, "c": 2}
DEFAULT_SIZE = {"a": (32, 32), "b": (224, 224), "c": (320, 480)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--case", nargs="+", default=["all"], help="a, b, c or all")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default per case and device)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default per case and device)")
    p.add_argument("--batch-size", type=int, default=None, help="override every case's batch size")
    p.add_argument("--image-size", default=None, help="override the input size of cases b and c: N or HxW")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=None, help="loader worker processes (default: the config's)")
    p.add_argument("--loader-only", action="store_true", help="time the data loaders only")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-path comparison of case a")
    p.add_argument("--path", choices=("fast", "plain"), default="fast",
                   help="fast: the config's defaults; plain: no BN folding, channels_last, AMP or compile")
    p.add_argument("--no-mem-probe", action="store_true",
                   help="CPU: report peak memory from the timed process instead of a separate probe")
    p.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mdistiller", default="", help="path of an mdistiller checkout to compare case a with")
    p.add_argument("--rounds", type=int, default=4, help="alternating ours/mdistiller rounds of --steps steps")
    p.add_argument("--mdistiller-layout", choices=("native", "ours"), default="native",
                   help="memory layout of mdistiller's batch: native = contiguous NCHW, as its own loader "
                        "(ToTensor, Normalize, default collate) yields; ours = the NHWC batch our loader yields")
    p.add_argument("--det-opts", nargs="*", default=[], help="extra detectron2 KEY VALUE overrides for case c")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG results")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    cases = CASES if "all" in args.case else tuple(args.case)
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown case {bad[0]!r}; valid: {', '.join(CASES)}, all")
    args.cases = cases
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


# ----------------------------------------------------------------------------- measurement
class Memory:
    """Peak memory growth over a code region, in MiB: above what was allocated at its start
    (CUDA ``max_memory_allocated``), or on the CPU above the resident set size at its start."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _status(field: str) -> Optional[float]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return float(line.split()[1]) / 1024.0
        except OSError:
            pass
        return None

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:  # "5" resets the peak-RSS counter (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.base = self._status("VmRSS") or 0.0

    def peak_mb(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        hwm = self._status("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return max(hwm - self.base, 0.0)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], warmup: int, steps: int, device) -> List[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: List[float], batch: int) -> Dict[str, float]:
    ms = sorted(t * 1000.0 for t in times)
    p90 = ms[min(len(ms) - 1, max(0, math.ceil(0.9 * len(ms)) - 1))]
    return {
        "images_per_s": round(batch * len(times) / sum(times), 2),
        "step_ms_mean": round(statistics.fmean(ms), 2),
        "step_ms_p90": round(p90, 2),
    }


def measure(step, warmup: int, steps: int, batch: int, device) -> Dict[str, float]:
    """Timing and peak-memory growth of ``steps`` steps after ``warmup`` (one-time set-up excluded)."""
    time_steps(step, warmup, 0, device)
    mem = Memory(device)
    mem.start()
    res = summarize(time_steps(step, 0, steps, device), batch)
    res["peak_mem_mb"] = round(mem.peak_mb(), 1)
    return res


def time_loader(loader, n_batches: int, device) -> Optional[float]:
    """Images/s of iterating ``loader`` alone (first batch untimed: worker start-up)."""
    it = iter(loader)
    try:
        next(it)
    except StopIteration:
        return None
    sync(device)
    n_img, t0 = 0, time.perf_counter()
    for _, batch in zip(range(n_batches), it):
        n_img += batch[0].shape[0]
    sync(device)
    dt = time.perf_counter() - t0
    return round(n_img / dt, 1) if n_img else None


# ----------------------------------------------------------------------------- generated data
def write_cifar100(root: str, n_train: int, n_test: int, seed: int = 0) -> None:
    """CIFAR-100 python-format pickles (``data`` (N, 3072) uint8, ``fine_labels``) under ``root``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": rng.integers(0, 100, n).tolist(),
            "coarse_labels": rng.integers(0, 20, n).tolist(),
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": split,
        }
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(entry, f)


def write_imagefolder(root: str, n_train: int, n_val: int, classes: int = 4, seed: int = 0) -> None:
    """An ImageNet-style ``imagenet/{train,val}/<wnid>/*.JPEG`` tree of 375x500 random JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = os.path.join(root, "imagenet", split, f"n{i % classes:08d}")
            os.makedirs(d, exist_ok=True)
            # Smooth noise compresses and decodes like a photo, unlike white noise.
            small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(os.path.join(d, f"img_{i}.JPEG"), quality=90)


# ----------------------------------------------------------------------------- classification
def _cls_cfg(config_file: str, batch: int, tmp: str, workers: Optional[int], fast: bool):
    from kd_cls.config import get_cfg

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
    from kd_cls.engine.trainer import get_trainer
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


def run_classification(case: str, args, device, tmp: str) -> Dict:
    import torch

    from kd_cls.data.registry import get_dataset_info

    warmup, steps = _steps(case, args, device)
    batch = args.batch_size or DEFAULT_BATCH[case]
    hw = args.image_hw if (args.image_hw and case != "a") else None  # CIFAR models are 32x32 only
    if case == "a":
        config_file = "configs/cifar100/dkd/res32x4_res8x4.yaml"
        write_cifar100(tmp, n_train=max(1024, batch * 8), n_test=256)
    else:
        config_file = "configs/imagenet/r34_r18/kd.yaml"
        write_imagefolder(tmp, n_train=max(16, batch * 8), n_val=8)
    cfg = _cls_cfg(config_file, batch, tmp, args.workers, fast=args.path == "fast")
    info = get_dataset_info(cfg.DATASET.TYPE)
    out: Dict = {"case": case, "device": device.type, "path": args.path, "method": cfg.DISTILLER.TYPE,
                 "teacher": cfg.DISTILLER.TEACHER, "student": cfg.DISTILLER.STUDENT, "batch_size": batch}
    train_loader = info.build(cfg)[0]
    n_loader = max(2, len(train_loader) - 1)  # every batch but the first: prefetching has drained
    out["loader_images_per_s"] = None if args._probe else time_loader(train_loader, n_loader, device)
    if case == "a" and not args._probe:  # the reference per-image PIL pipeline, for comparison
        cfg_pil = cfg.clone()
        cfg_pil.DATASET.BATCH_AUG = False
        out["loader_pil_images_per_s"] = time_loader(info.build(cfg_pil)[0], n_loader, device)
    first = _resize_batch(next(iter(train_loader)), hw)
    out["image_size"] = list(first[0].shape[-2:])
    if args.loader_only:
        out.update(images_per_s=out["loader_images_per_s"], step_ms_mean=None, step_ms_p90=None, peak_mem_mb=None)
        return out

    trainer = _build_trainer(cfg, case)
    step = lambda: trainer.train_step(first, 1)  # noqa: E731
    out.update(measure(step, warmup, steps, batch, device))
    out.update(warmup=warmup, steps=steps, fold_teacher_bn=bool(cfg.SOLVER.FOLD_TEACHER_BN),
               channels_last=bool(trainer.channels_last), amp=str(cfg.SOLVER.AMP), compile=bool(cfg.SOLVER.COMPILE))
    copy_ = trainer.distiller.__dict__.get("_teacher_infer")
    if copy_ is not None:  # resident before the timed steps, so not in peak_mem_mb
        out["teacher_copy_mb"] = round(sum(t.numel() * t.element_size() for t in copy_.state_dict().values()) / 2**20, 1)
        out["folded_bns"] = len(getattr(copy_, "folded_pairs", {}))
    if args._probe:
        return out
    if device.type == "cpu" and not args.no_mem_probe:
        out["peak_mem_mb"] = run_child(args, case, args.path, probe=True)["peak_mem_mb"]
    if hw is None:  # the whole loop, loader included
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
        out.update(compare_mdistiller(args, trainer, first, cfg, warmup, steps, device))
    return out


def run_child(args, case: str, path: str, probe: bool) -> Dict:
    """One case in a fresh process (so that its peak memory is its own).

    A memory probe runs two steps after one warm-up step with glibc told to
    serve every allocation of 64 KiB or more by ``mmap``, so that freed memory
    leaves the resident set at once and the peak RSS growth is the peak of live
    tensors. (That costs time, so probes are not timed.)
    """
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--case", case, "--path", path,
           "--no-plain", "--no-mem-probe", "--no-plot"]
    env = dict(os.environ)
    if probe:
        cmd += ["--_probe", "--steps", "2", "--warmup", "1"]
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for flag, value in (("--steps", None if probe else args.steps), ("--warmup", None if probe else args.warmup),
                        ("--batch-size", args.batch_size), ("--image-size", args.image_size),
                        ("--threads", args.threads), ("--workers", args.workers)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--det-opts"] + list(args.det_opts) if args.det_opts else []
    # The child's JSON line is read from its stdout; the file it also writes is thrown away.
    with tempfile.TemporaryDirectory(prefix="kd_bench_child_") as out:
        cmd += ["--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child run failed ({' '.join(cmd)}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _steps(case: str, args, device):
    w, s = DEFAULT_STEPS["cuda" if device.type == "cuda" else "cpu"][case]
    return (w if args.warmup is None else args.warmup), (s if args.steps is None else max(1, args.steps))


# ----------------------------------------------------------------------------- mdistiller
def compare_mdistiller(args, trainer, batch, cfg, warmup: int, steps: int, device) -> Dict:
    """Alternate rounds of our trainer step and mdistiller's DKD step on the same in-memory batch.

    mdistiller's step is its ``DKD`` distiller's forward, backward and SGD step
    (its trainer's ``optimizer.zero_grad(); loss.backward(); optimizer.step()``),
    with the same weights, batch and thread count. Returns the median ratio.
    """
    import torch

    path = os.path.abspath(args.mdistiller)
    if not os.path.isdir(os.path.join(path, "mdistiller")):
        raise FileNotFoundError(
            f"--mdistiller {args.mdistiller}: no mdistiller package there; "
            "clone https://github.com/megvii-research/mdistiller and pass the clone's folder"
        )
    sys.path.insert(0, path)
    try:
        from mdistiller.distillers import distiller_dict
        from mdistiller.models import cifar_model_dict
    finally:
        sys.path.remove(path)
    md_teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100)
    md_student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=100)
    ours = trainer.distiller
    # The zoo keeps mdistiller's parameter names: both start from the same weights.
    md_teacher.load_state_dict(ours.teacher.state_dict())
    md_student.load_state_dict(ours.student.state_dict())
    md_cfg = types.SimpleNamespace(DKD=types.SimpleNamespace(**{k: cfg.DKD[k] for k in cfg.DKD}))
    theirs = distiller_dict["DKD"](md_student, md_teacher, md_cfg).to(device).train()
    opt = torch.optim.SGD(theirs.get_learnable_parameters(), lr=cfg.SOLVER.LR, momentum=cfg.SOLVER.MOMENTUM,
                          weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    image = batch[0].to(device).float()
    # Our CIFAR loader yields NHWC (channels_last) batches, one of our fast paths; mdistiller's yields
    # contiguous NCHW ones. Handing it ours would give it that fast path too.
    if args.mdistiller_layout == "native":
        image = image.contiguous()
    target = batch[1].to(device)
    epoch = int(cfg.DKD.WARMUP) + 1  # past warm-up: both compute the full loss

    def their_step():
        opt.zero_grad(set_to_none=True)
        _, losses = theirs(image=image, target=target, epoch=epoch)
        loss = sum(l.mean() for l in losses.values())
        loss.backward()
        opt.step()
        return loss.detach()

    # Same loss on the first step (before either updates): both compute the same thing.
    ours_loss = float(trainer.train_step(batch, epoch)["loss"])
    md_loss = float(their_step())
    our_step = lambda: trainer.train_step(batch, epoch)  # noqa: E731
    time_steps(our_step, warmup, 0, device)
    time_steps(their_step, warmup, 0, device)
    ratios, cpu_ratios, ours_ips, md_ips = [], [], [], []
    for _ in range(max(1, args.rounds)):
        c0 = time.process_time()
        a = summarize(time_steps(our_step, 0, steps, device), image.shape[0])["images_per_s"]
        c1 = time.process_time()
        b = summarize(time_steps(their_step, 0, steps, device), image.shape[0])["images_per_s"]
        c2 = time.process_time()
        ours_ips.append(a)
        md_ips.append(b)
        ratios.append(round(a / b, 3))
        cpu_ratios.append(round((c2 - c1) / max(c1 - c0, 1e-9), 3))
    return {
        "mdistiller_images_per_s": round(statistics.median(md_ips), 2),
        "ours_alternating_images_per_s": round(statistics.median(ours_ips), 2),
        "mdistiller_ratio": round(statistics.median(ratios), 3),
        "mdistiller_ratios": ratios,
        # CPU seconds theirs / ours per round: less sensitive than wall time to other load on the machine.
        "mdistiller_cpu_time_ratio": round(statistics.median(cpu_ratios), 3),
        "mdistiller_cpu_time_ratios": cpu_ratios,
        "mdistiller_input_layout": "channels_last" if image.is_contiguous(memory_format=torch.channels_last)
        and not image.is_contiguous() else "contiguous",
        "mdistiller_first_loss": round(md_loss, 5),
        "ours_first_loss": round(ours_loss, 5),
    }


# ----------------------------------------------------------------------------- detection
def run_detection(args, device, tmp: str) -> Dict:
    import torch

    try:
        import kd_det  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"case c needs detectron2 and kd_det ({e}); run `make venv`") from None
    from kd_cls.hooks import FeatureCapture
    from kd_det.config import get_kd_cfg
    from kd_det.testing import synthetic_batch

    warmup, steps = _steps("c", args, device)
    batch = args.batch_size or DEFAULT_BATCH["c"]
    h, w = args.image_hw or DEFAULT_SIZE["c"]
    opts = ["MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "", "KD.ALLOW_RANDOM_TEACHER", "True",
            "OUTPUT_DIR", os.path.join(tmp, "det")] + list(args.det_opts)
    cfg = get_kd_cfg(os.path.join(REPO, "configs/detection/ReviewKD/ReviewKD-R18-R101.yaml"), opts)
    out: Dict = {"case": "c", "device": device.type, "method": "RCNNKD ReviewKD", "teacher": "R-101-FPN",
                 "student": "R-18-FPN", "batch_size": batch, "image_size": [h, w], "warmup": warmup, "steps": steps}
    if args.loader_only:
        out.update(images_per_s=None, step_ms_mean=None, step_ms_p90=None, peak_mem_mb=None)
        return out
    import kd_det
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = kd_det.build_kd_model(cfg).to(device).train()
    inputs = synthetic_batch(batch, h, w, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    kd_params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: random weights must not diverge over the timed steps; the work per step is the same.
    opt_kd = torch.optim.SGD(kd_params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    # The reference: detectron2's own GeneralizedRCNN (its own RoIAlign too), with the student's weights.
    from detectron2.modeling import build_model as d2_build_model

    from kd_det.roi_align import use_fast_roi_align

    pcfg = cfg.clone()
    pcfg.defrost()
    pcfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    plain = d2_build_model(pcfg).to(device).train()
    plain.load_state_dict(model.student_state_dict())
    opt_plain = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.0, momentum=0.9,
                                weight_decay=1e-4)
    fast_roi = bool(cfg.KD.FAST_ROI_ALIGN)

    def kd_step():
        opt_kd.zero_grad(set_to_none=True)
        sum(model(inputs).values()).backward()
        opt_kd.step()

    proposals = {}
    cap = FeatureCapture(plain, ["roi_heads"])

    def student_step(fast: bool):
        use_fast_roi_align(plain, fast)  # each caller sets the class it times, so no reset is needed
        opt_plain.zero_grad(set_to_none=True)
        with cap:
            losses = plain(inputs)
        proposals["sampled"] = cap.features["roi_heads"]
        cap.clear()
        sum(losses.values()).backward()
        opt_plain.step()

    def plain_step():  # detectron2's own GeneralizedRCNN training step of the student
        student_step(False)

    def fast_student_step():  # the same step with kd_det's RoIAlign (KD.FAST_ROI_ALIGN)
        student_step(True)

    teacher = model.teacher

    def teacher_forward():  # one inference pass of the teacher: backbone, then box head on the sampled RoIs
        with torch.inference_mode():
            images = model.preprocess_teacher_image(inputs).tensor
            feats = teacher.backbone(images)
            rh = teacher.roi_heads
            boxes = [p.proposal_boxes for p in proposals["sampled"]]
            rh.box_predictor(rh.box_head(rh.box_pooler([feats[f] for f in rh.box_in_features], boxes)))

    parts = [(kd_step, []), (plain_step, []), (teacher_forward, [])]
    if fast_roi:
        parts.append((fast_student_step, []))
    with EventStorage(0):  # detectron2's training forward logs into one
        plain_step()
        for _ in range(warmup):
            for fn, _acc in parts:
                fn()
        mem, peak = Memory(device), 0.0
        # Interleaved, so that the parts see the same machine load.
        for _ in range(steps):
            for fn, acc in parts:
                if fn is kd_step:  # the memory figure is the distillation step's own
                    mem.start()
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                acc.append(time.perf_counter() - t0)
                if fn is kd_step:
                    peak = max(peak, mem.peak_mb())
    t_kd, t_plain, t_teacher = (acc for _fn, acc in parts[:3])
    out.update(summarize(t_kd, batch))
    out["peak_mem_mb"] = round(peak, 1)
    plain_ms = statistics.fmean(t_plain) * 1000
    teacher_ms = statistics.fmean(t_teacher) * 1000
    out.update(student_plain_step_ms=round(plain_ms, 2), teacher_forward_ms=round(teacher_ms, 2),
               parts_sum_ms=round(plain_ms + teacher_ms, 2),
               ratio_to_parts=round(out["step_ms_mean"] / (plain_ms + teacher_ms), 3), fast_roi_align=fast_roi)
    if fast_roi:
        # What KD adds on top of the student's own (fast) step: teacher pass, ABF/HCL, their backward.
        fast_ms = statistics.fmean(parts[3][1]) * 1000
        out.update(student_fast_step_ms=round(fast_ms, 2), kd_added_ms=round(out["step_ms_mean"] - fast_ms, 2))
    out["within_bound_1.1"] = out["ratio_to_parts"] <= 1.1
    return out


# ----------------------------------------------------------------------------- output
def plot(results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        bars = {"ours": r.get("images_per_s")}
        for key, label in (("plain_images_per_s", "plain path"), ("mdistiller_images_per_s", "mdistiller"),
                           ("images_per_s_with_loader", "ours + loader"), ("loader_images_per_s", "loader only")):
            if r.get(key):
                bars[label] = r[key]
        if r["case"] == "c" and r.get("parts_sum_ms"):
            bars["plain student + teacher fwd"] = round(r["batch_size"] * 1000 / r["parts_sum_ms"], 2)
        bars = {k: v for k, v in bars.items() if v}
        ax.bar(range(len(bars)), list(bars.values()), color="tab:blue")
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(list(bars), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title(f"case {r['case']} ({r['device']}): {r.get('teacher')} -> {r.get('student')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
            r = run_detection(args, device, tmp) if case == "c" else run_classification(case, args, device, tmp)
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
