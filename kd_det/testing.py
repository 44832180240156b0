"""Overrides and inputs for smoke tests of detection configs on the CPU (tiny images, few RoIs)."""
from __future__ import annotations

import contextlib
import glob
import os
from typing import Dict, List

import torch

TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "KD.ALLOW_RANDOM_TEACHER", "True",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "64",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    # Random ResNets with FrozenBN (no pretrained statistics) give losses up to ~1e7;
    # clipping keeps the first SGD step from sending the second forward to Inf/NaN.
    "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
]


def synthetic_batch(n: int = 2, height: int = 64, width: int = 96, num_classes: int = 80, seed: int = 0) -> List[Dict]:
    """``n`` detectron2 input dicts with random images (uint8 range, float) and two boxes each."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]))
        inst.gt_classes = torch.randint(0, num_classes, (2,), generator=g)
        image = torch.randint(0, 256, (3, height, width), generator=g).float()
        out.append({"image": image, "instances": inst, "height": height, "width": width})
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` intra-op threads, then restore the previous count.

    Detection tests are dominated by many small ops; on a shared 2-core machine
    one thread per process is faster than two that wait for each other.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _arch(path: str) -> str:
    from kd_cls.config import config_file_chain

    for _, d in config_file_chain(path):
        arch = (d.get("MODEL") or {}).get("META_ARCHITECTURE")
        if arch:
            return arch
    return ""


def kd_config_names(det_configs_dir: str) -> List[str]:
    """mdistiller's 12 detection configs as mirrored here (``RCNNKD`` files of ``DKD/``, ``ReviewKD/``), relative."""
    return sorted(
        os.path.relpath(p, det_configs_dir)
        for d in ("DKD", "ReviewKD")
        for p in glob.glob(os.path.join(det_configs_dir, d, "*.yaml"))
        if _arch(p) == "RCNNKD"
    )


def example_config_names(det_configs_dir: str) -> List[str]:
    """The distillation configs written for this toolkit (``KD.METHODS``; any family), relative, sorted."""
    return sorted(
        os.path.relpath(p, det_configs_dir)
        for p in glob.glob(os.path.join(det_configs_dir, "*", "*.yaml"))
        if not os.path.basename(os.path.dirname(p)).startswith("COCO-") and _arch(p) != "RCNNKD"
    )


#: R-18 detector configs of each family (small, for tests), relative to the repository's configs/detection.
FAMILY_CONFIGS = {
    "rcnn": "COCO-Detection/faster_rcnn_R_18_FPN_3x.yaml",
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_18_FPN_3x.yaml",
    "retinanet": "COCO-Detection/retinanet_R_18_FPN_3x.yaml",
    "fcos": "COCO-Detection/fcos_R_18_FPN_1x.yaml",
}


def write_kd_config(folder, det_configs_dir: str, student: str, teacher: str, methods, extra: str = "") -> str:
    """A distillation config made only of ``_BASE_`` (the student family's R-18 config), ``TEACHER.CONFIG_FILE``
    (the teacher family's) and ``KD.METHODS``, plus ``extra`` YAML lines under ``KD:``; returns its path."""
    path = os.path.join(str(folder), f"{teacher}-to-{student}.yaml")
    with open(path, "w") as f:
        f.write(f'_BASE_: "{os.path.join(det_configs_dir, FAMILY_CONFIGS[student])}"\n'
                f'TEACHER:\n  CONFIG_FILE: "{os.path.join(det_configs_dir, FAMILY_CONFIGS[teacher])}"\n'
                f"KD:\n  METHODS: {list(methods)}\n" + extra)
    return path


def stub_detector(strides, channels: int = 8):
    """A module whose ``backbone.output_shape()`` lists FPN levels of the given strides (pairing tests)."""
    from detectron2.layers import ShapeSpec
    from torch import nn

    class Backbone(nn.Module):
        def output_shape(self):
            return {f"p{s.bit_length() - 1}": ShapeSpec(channels=channels, stride=s) for s in strides}

    det = nn.Module()
    det.backbone = Backbone()
    return det
