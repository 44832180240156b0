"""Cases c and d: a detection distillation step against its parts.

* c: mdistiller's RCNNKD ReviewKD, Faster R-CNN R-101-FPN -> R-18-FPN;
* d: ReviewKD, RetinaNet R-101-FPN -> RetinaNet R-18-FPN.

The parts, timed interleaved with the distillation step: the student's own
training step (a deep copy of the distiller's student, so the same detector;
for R-CNN with detectron2's RoIAlign, and again with kd_det's when
``KD.FAST_ROI_ALIGN`` is on), and one inference pass of the teacher: its
backbone, then its head (R-CNN: the box head on the student's sampled RoIs;
dense: the head on every level), whether or not the method reads the head.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Dict

from . import DEFAULT_BATCH, DEFAULT_SIZE, REPO, case_steps
from .measure import Memory, summarize, sync

DET_CASES = {
    "c": dict(config="configs/detection/ReviewKD/ReviewKD-R18-R101.yaml", method="RCNNKD ReviewKD",
              teacher="R-101-FPN", student="R-18-FPN"),
    "d": dict(config="configs/detection/ReviewKD/ReviewKD-RetinaNet-R18-R101.yaml", method="ReviewKD",
              teacher="RetinaNet R-101-FPN", student="RetinaNet R-18-FPN"),
}


def _teacher_forward(model, inputs, sampled):
    """One inference pass of the teacher (see the module docstring), under inference mode."""
    import torch

    teacher = model.teacher
    with torch.inference_mode():
        images = model.preprocess_teacher_image(inputs).tensor
        feats = teacher.backbone(images)
        if model.pair.teacher_family == "rcnn":
            rh = teacher.roi_heads
            boxes = [p.proposal_boxes for p in sampled["rois"]]
            rh.box_predictor(rh.box_head(rh.box_pooler([feats[f] for f in rh.box_in_features], boxes)))
        else:
            teacher.head([feats[f] for f in teacher.head_in_features])


def run_detection(case: str, args, device, tmp: str) -> Dict:
    import torch

    try:
        import kd_det  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"case {case} needs detectron2 and kd_det ({e}); run `make venv`") from None
    from kd_cls.hooks import FeatureCapture
    from kd_det.config import get_kd_cfg
    from kd_det.testing import synthetic_batch

    spec = DET_CASES[case]
    warmup, steps = case_steps(case, args, device)
    batch = args.batch_size or DEFAULT_BATCH[case]
    h, w = args.image_hw or DEFAULT_SIZE[case]
    opts = ["MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "", "KD.ALLOW_RANDOM_TEACHER", "True",
            "TEACHER.MODEL.WEIGHTS", "", "OUTPUT_DIR", os.path.join(tmp, "det")] + list(args.det_opts)
    cfg = get_kd_cfg(os.path.join(REPO, spec["config"]), opts)
    out: Dict = {"case": case, "device": device.type, "method": spec["method"], "teacher": spec["teacher"],
                 "student": spec["student"], "batch_size": batch, "image_size": [h, w], "warmup": warmup,
                 "steps": steps}
    if args.loader_only:
        out.update(images_per_s=None, step_ms_mean=None, step_ms_p90=None, peak_mem_mb=None)
        return out
    from detectron2.utils.events import EventStorage

    from kd_det.roi_align import use_fast_roi_align

    torch.manual_seed(0)
    model = kd_det.build_kd_model(cfg).to(device).train()
    rcnn = model.pair.student_family == "rcnn"
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES if rcnn else model.student.num_classes
    inputs = synthetic_batch(batch, h, w, num_classes=num_classes)
    # lr 0: random weights must not diverge over the timed steps; the work per step is the same.
    opt_kd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9,
                             weight_decay=1e-4)
    plain = copy.deepcopy(model.student).train()
    opt_plain = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.0, momentum=0.9,
                                weight_decay=1e-4)
    fast_roi = bool(cfg.KD.FAST_ROI_ALIGN) and rcnn

    def kd_step():
        opt_kd.zero_grad(set_to_none=True)
        sum(model(inputs).values()).backward()
        opt_kd.step()

    sampled = {}
    cap = FeatureCapture(plain, ["roi_heads"]) if rcnn else None

    def student_step(fast: bool):
        if rcnn:
            use_fast_roi_align(plain, fast)  # each caller sets the class it times, so no reset is needed
            with cap:
                losses = plain(inputs)
            sampled["rois"] = cap.features["roi_heads"]
            cap.clear()
        else:
            losses = plain(inputs)
        opt_plain.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt_plain.step()

    def plain_step():  # the student's own training step (for R-CNN with detectron2's RoIAlign)
        student_step(False)

    def fast_student_step():  # the same step with kd_det's RoIAlign (KD.FAST_ROI_ALIGN)
        student_step(True)

    def teacher_forward():
        _teacher_forward(model, inputs, sampled)

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
    if getattr(args, "det_methods", None):
        from .det_methods import DEFAULT_METHODS, run_method_overheads

        methods = DEFAULT_METHODS[case] if "all" in args.det_methods else list(args.det_methods)
        with EventStorage(0):
            out["method_overheads"] = run_method_overheads(case, cfg, model.student, model.teacher, methods, inputs,
                                                           warmup, steps, device)
    return out
