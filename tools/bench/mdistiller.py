"""Case a against mdistiller's own DKD step, in alternating rounds on the same batch."""
from __future__ import annotations

import os
import statistics
import sys
import time
import types
from typing import Callable, Dict, Optional

from .measure import summarize, time_steps


def compare_mdistiller(args, trainer, batch, cfg, warmup: int, steps: int, device,
                       before_step: Optional[Callable[[], None]] = None) -> Dict:
    """Alternate rounds of our trainer step and mdistiller's DKD step on the same in-memory batch.

    mdistiller's step is its ``DKD`` distiller's forward, backward and SGD step
    (its trainer's ``optimizer.zero_grad(); loss.backward(); optimizer.step()``),
    with the same weights, batch and thread count. ``before_step`` runs inside
    each of our timed steps (a cold teacher cache clears the batch's entries).
    Returns the median ratio.
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

    def our_step():
        if before_step is not None:
            before_step()
        return trainer.train_step(batch, epoch)

    # Same loss on the first step (before either updates): both compute the same thing.
    ours_loss = float(our_step()["loss"])
    md_loss = float(their_step())
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
