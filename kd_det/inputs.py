"""What a detection KD method reads in one training step, each part computed once and only on demand.

The student's side is recorded by forward hooks during the student's own
training pass (no ``forward`` is edited): its FPN outputs, bottom-up features,
sampled RoIs and their class logits, dense-head outputs and anchors, and any
module a method taps. The teacher's side is computed lazily, the first time a
method reads it, under ``torch.inference_mode()`` from the teacher's BN-folded
inference copy, then cloned into normal tensors (inference tensors cannot be
saved for the student's backward pass).
"""
from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from detectron2.structures import ImageList

from kd_cls.hooks import resolve_module

__all__ = ["StudentRecorder", "KDInputs"]


class StudentRecorder:
    """Forward hooks on the student that keep full module outputs.

    ``single``: ``{key: path}``, the output of the module's last call;
    ``multi``: paths whose outputs of every call are kept in order (a head run once per level).
    """

    def __init__(self, model: nn.Module, single: Dict[str, str], multi: Sequence[str] = ()):
        self.single = dict(single)
        self.multi = list(dict.fromkeys(multi))
        self.values: Dict[str, object] = {}
        self.lists: Dict[str, List[torch.Tensor]] = {}
        # Records only inside ``recording()``: evaluation passes of the student keep nothing.
        self.active = False
        self._handles = []
        for key, path in self.single.items():
            module = resolve_module(model, path)
            self._handles.append(module.register_forward_hook(
                lambda m, args, out, key=key: self.values.__setitem__(key, out) if self.active else None))
        for path in self.multi:
            module = resolve_module(model, path)
            self._handles.append(module.register_forward_hook(
                lambda m, args, out, path=path: self.lists.setdefault(path, []).append(out) if self.active
                else None))

    @contextlib.contextmanager
    def recording(self):
        self.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def clear(self) -> None:
        self.values, self.lists = {}, {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class KDInputs:
    """One step's inputs for the KD methods (fields are computed when first read).

    Student fields carry gradients; teacher fields do not (except what a method
    computes itself from ``teacher`` with autograd on, as CrossKD does).

    * ``gt_instances`` (list of ``Instances`` on the device), ``image_sizes`` [(h, w)]: the student's inputs;
    * ``student_fpn`` / ``teacher_fpn``: ``{level: (N, C, H, W)}``; ``fpn_pairs``:
      ``[(stride, student level, teacher level, student channels, teacher channels)]``;
    * ``student_bottom_up`` / ``teacher_bottom_up``: ``{name: (N, C, H, W)}``;
    * R-CNN: ``proposals`` (the student's sampled RoIs, ``Instances`` per image with ``gt_classes``),
      ``student_roi_logits`` / ``teacher_roi_logits`` ``(R, K + 1)``, ``roi_gt_classes`` ``(R,)``;
    * dense: ``student_head`` / ``teacher_head`` (the heads' outputs: per-output lists over levels of
      ``(N, A*K | A*4 | A, H, W)``), ``anchors`` (list over levels of ``Boxes``), ``anchor_labels``
      (list over images of ``(R,)`` labels in ``{-1 ignore, 0..K-1, K background}``) and
      ``matched_gt_boxes`` (list over images of ``(R, 4)``);
    * ``taps``: ``{path: [outputs of each call]}`` of the modules methods tapped;
    * ``student``, ``teacher``: the two detectors (the teacher frozen).
    """

    def __init__(self, distiller, batched_inputs: List[dict], recorder: StudentRecorder):
        self._d = distiller
        self.batched_inputs = batched_inputs
        self._values = recorder.values
        self.taps = recorder.lists
        self.student = distiller.student
        self.teacher = distiller.teacher
        self.fpn_pairs = distiller.pair.fpn_pairs

    # ------------------------------------------------------------------ ground truth
    @cached_property
    def gt_instances(self):
        return [x["instances"].to(self._d.device) for x in self.batched_inputs]

    @cached_property
    def image_sizes(self):
        return [tuple(x["image"].shape[-2:]) for x in self.batched_inputs]

    # ------------------------------------------------------------------ student (recorded)
    def _recorded(self, key: str):
        if key not in self._values:
            raise RuntimeError(f"the student's {key} was not recorded this step; declare it in the method's NEEDS")
        return self._values[key]

    @cached_property
    def student_fpn(self) -> Dict[str, torch.Tensor]:
        return self._recorded("fpn")

    @cached_property
    def student_bottom_up(self) -> Dict[str, torch.Tensor]:
        return self._recorded("bottom_up")

    @cached_property
    def proposals(self):
        return self._recorded("roi_heads")[0]

    @cached_property
    def student_roi_logits(self) -> torch.Tensor:
        return self._recorded("box_predictor")[0]

    @cached_property
    def roi_gt_classes(self) -> torch.Tensor:
        return torch.cat([p.gt_classes for p in self.proposals])

    @cached_property
    def student_head(self):
        return self._recorded("head")

    @cached_property
    def anchors(self):
        return self._recorded("anchor_generator")

    @cached_property
    def _anchor_targets(self):
        with torch.no_grad():
            return self.student.label_anchors(self.anchors, self.gt_instances)

    @property
    def anchor_labels(self) -> List[torch.Tensor]:
        return self._anchor_targets[0]

    @property
    def matched_gt_boxes(self) -> List[torch.Tensor]:
        return [b.tensor if hasattr(b, "tensor") else b for b in self._anchor_targets[1]]

    # ------------------------------------------------------------------ teacher (inference copy)
    @cached_property
    def teacher_images(self) -> ImageList:
        return self._d.preprocess_teacher_image(self.batched_inputs)

    @cached_property
    def _teacher_backbone(self):
        taps = ["bottom_up"] if self._d.records_bottom_up else []
        fpn, feats = self._d.frozen_teacher.run(self.teacher_images.tensor, taps=taps, part="backbone")
        return fpn, (feats[0] if feats else None)

    @cached_property
    def teacher_fpn(self) -> Dict[str, torch.Tensor]:
        return self._teacher_backbone[0]

    @cached_property
    def teacher_bottom_up(self) -> Optional[Dict[str, torch.Tensor]]:
        return self._teacher_backbone[1]

    @cached_property
    def teacher_roi_logits(self) -> torch.Tensor:
        rh = self._d.frozen_teacher.inference_module("roi_heads")
        feats = self.teacher_fpn
        with torch.inference_mode():
            x = rh.box_pooler([feats[f] for f in rh.box_in_features], [p.proposal_boxes for p in self.proposals])
            scores = rh.box_predictor(rh.box_head(x))
        scores = scores[0] if isinstance(scores, (tuple, list)) else scores
        return scores.clone()

    @cached_property
    def teacher_head(self):
        head = self._d.frozen_teacher.inference_module("head")
        feats = [self.teacher_fpn[f] for f in self.teacher.head_in_features]
        with torch.inference_mode():
            out = head(feats)
        return type(out)([t.clone() for t in level] for level in out)
