"""What each detection KD method adds to a training step (cases c and d, ``--det-methods``).

For each method M, two distillers share one student and one teacher (the
case's): one runs M, the other a no-op method that declares M's needs and reads
the same inputs, so the teacher's parts and the fast paths are the same. Their
steps are timed interleaved; M's overhead is the difference. M's own modules
are also timed alone: forward and backward of M on the step's inputs, detached
from the student's graph (CrossKD's includes the rest of the teacher's head,
which it runs with autograd on).

The targets: FitNet, PKD, CWD and FGD add at most 15 % of the no-op step;
MGD, ReviewKD and CrossKD, whose FLOPs their design fixes, add at most 1.2x
their own modules' forward+backward.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Dict, List

from .measure import sync

CHEAP = ("FitNet", "PKD", "CWD", "FGD", "DKD")
HEAVY = ("MGD", "ReviewKD", "CrossKD")
DEFAULT_METHODS = {"c": ["FitNet", "PKD", "CWD", "FGD", "MGD", "ReviewKD", "DKD"],
                   "d": ["FitNet", "PKD", "CWD", "FGD", "MGD", "ReviewKD", "CrossKD"]}


def _noop_method(method):
    """A method with ``method``'s needs and taps that reads what they provide and adds a zero loss."""
    import torch

    from kd_det.methods.base import BOTTOM_UP, DENSE_HEAD, FPN, ROI_LOGITS, KDMethod

    class NoOp(KDMethod):
        NAME = f"NoOp[{method.NAME}]"
        ATTR = "kd_noop"
        NEEDS = tuple(method.NEEDS)

        def __init__(self):
            super().__init__()
            self._taps = list(method.student_taps())

        def student_taps(self):
            return self._taps

        def forward(self, inputs):
            touched = []
            if FPN in self.NEEDS:
                touched += list(inputs.student_fpn.values()) + list(inputs.teacher_fpn.values())
            if BOTTOM_UP in self.NEEDS:
                touched += list(inputs.student_bottom_up.values()) + list(inputs.teacher_bottom_up.values())
            if ROI_LOGITS in self.NEEDS:
                touched += [inputs.student_roi_logits, inputs.teacher_roi_logits]
            if DENSE_HEAD in self.NEEDS:
                touched += [t for out in inputs.student_head for t in out] + inputs.anchor_labels
                touched += [t for out in inputs.teacher_head for t in out]
            for outs in inputs.taps.values():
                touched += list(outs)
            graph = [t for t in touched if torch.is_tensor(t) and t.requires_grad]
            return {"loss_noop": sum(t.sum() * 0.0 for t in graph) if graph else torch.zeros(())}

    return NoOp()


def _detached(inputs):
    """``inputs`` with every student tensor cut from the student's graph (a fresh leaf that wants grad)."""
    import torch

    def cut(x):
        if torch.is_tensor(x) and x.requires_grad:
            return x.detach().requires_grad_()
        if isinstance(x, dict):
            return type(x)((k, cut(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(cut(v) for v in x)
        return x

    out = copy.copy(inputs)
    out.__dict__ = {k: cut(v) if not k.startswith("_d") and k not in ("student", "teacher") else v
                    for k, v in inputs.__dict__.items()}
    out._values = cut(inputs._values)
    out.taps = cut(inputs.taps)
    return out


def run_method_overheads(case: str, cfg, student, teacher, methods: List[str], inputs_batch, warmup: int,
                         steps: int, device) -> List[Dict]:
    """Rows of ``{method, step_ms, noop_step_ms, overhead_ms, overhead_pct, module_ms, target, met}``."""
    import torch

    from kd_det.build import build_methods
    from kd_det.distiller import DetectionDistiller
    from kd_det.pairing import DetectorPair

    pair = DetectorPair.build(student, teacher)
    rows = []
    for name in methods:
        method = build_methods(cfg, pair, [name])[0].to(device)
        with_m = DetectionDistiller(student, teacher, [method], allow_random_teacher=True).train()
        noop = DetectionDistiller(student, teacher, [_noop_method(method)], allow_random_teacher=True).train()
        params = [p for p in with_m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)  # lr 0: the same work, no divergence
        seen = {}
        orig_forward = type(method).forward

        def step(m):
            opt.zero_grad(set_to_none=True)
            sum(m(inputs_batch).values()).backward()

        def module_alone():
            inp = _detached(seen["inputs"])
            loss = sum(orig_forward(method, inp).values())
            loss.backward()

        def capture(self, inputs):
            seen["inputs"] = inputs
            return orig_forward(self, inputs)

        type(method).forward = capture
        try:
            step(with_m)  # also records the inputs the method sees
        finally:
            type(method).forward = orig_forward
        times = {"m": [], "noop": [], "alone": []}
        parts = [("m", lambda: step(with_m)), ("noop", lambda: step(noop)), ("alone", module_alone)]
        for _ in range(warmup):
            for _k, fn in parts:
                fn()
        for _ in range(steps):
            for key, fn in parts:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[key].append(time.perf_counter() - t0)
        m_ms, n_ms, a_ms = (statistics.fmean(times[k]) * 1000 for k in ("m", "noop", "alone"))
        over = m_ms - n_ms
        if name in HEAVY:
            target, met = "overhead <= 1.2x its modules' forward+backward", over <= 1.2 * a_ms
        else:
            target, met = "overhead <= 15% of the no-op step", over <= 0.15 * n_ms
        rows.append({"case": case, "method": name, "step_ms": round(m_ms, 1), "noop_step_ms": round(n_ms, 1),
                     "overhead_ms": round(over, 1), "overhead_pct": round(100 * over / n_ms, 1),
                     "module_ms": round(a_ms, 1), "target": target, "met": bool(met), "steps": steps})
    return rows
