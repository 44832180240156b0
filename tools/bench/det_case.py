"""Case c: the detection distillation step (RCNNKD ReviewKD, R-101 -> R-18 FPN) against its parts.

The parts, timed interleaved with the distillation step: detectron2's own
GeneralizedRCNN training step of the student, the same step with kd_det's
RoIAlign (with ``KD.FAST_ROI_ALIGN``), and one inference pass of the teacher
(its backbone, then its box head on the student's sampled RoIs).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Dict

from . import DEFAULT_BATCH, DEFAULT_SIZE, REPO, case_steps
from .measure import Memory, summarize, sync


def run_detection(args, device, tmp: str) -> Dict:
    import torch

    try:
        import kd_det  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"case c needs detectron2 and kd_det ({e}); run `make venv`") from None
    from kd_cls.hooks import FeatureCapture
    from kd_det.config import get_kd_cfg
    from kd_det.testing import synthetic_batch

    warmup, steps = case_steps("c", args, device)
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
