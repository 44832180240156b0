"""Contrastive Representation Distillation (Tian et al., ICLR 2020, arXiv 1910.10699).

The pooled features of student and teacher are embedded (linear + L2 norm) into
``CRD.FEAT.DIM`` dimensions. Two memory banks hold one embedding per training
image (``num_data`` rows): the student's (``memory_v1``) and the teacher's
(``memory_v2``). Each sample is contrasted against its own row of the other
model's bank (the positive) and ``CRD.NCE.K`` other rows (negatives, from
images of other classes when the data loader supplies them). Rows are updated
with momentum ``CRD.NCE.MOMENTUM`` after each step.

Needs the sample's dataset index: use ``SOLVER.TRAINER: crd`` (or ``crd_dot``),
whose loaders yield ``(image, target, index, contrastive_index)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kd_cls.losses import crd_nce_loss
from kd_cls.models import get_taps
from kd_cls.nn.connectors import Embed

from ._feature_common import feature_pair_shapes
from .base import Distiller, count_params, register_distiller


class ContrastMemory(nn.Module):
    """Two memory banks of unit vectors, ``(num_data, dim)`` each, and the NCE scores.

    ``params`` holds ``[K, T, Z_v1, Z_v2, momentum]``; the normalisation constants
    ``Z`` are set from the first batch (-1 until then) and saved in checkpoints
    with the banks. Names and layout follow mdistiller, so its CRD checkpoints load.
    """

    def __init__(self, dim: int, num_data: int, k: int, temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        if num_data < 1:
            raise ValueError(f"CRD memory size (num_data) must be >= 1, got {num_data}")
        self.num_data = num_data
        self.k = int(k)
        self.register_buffer("params", torch.tensor([float(k), temperature, -1.0, -1.0, momentum]))
        # Uniform in [-s, s] with s = 1 / sqrt(dim / 3): unit expected squared norm per row.
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_v1", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv))

    def sample_indices(self, index: torch.Tensor) -> torch.Tensor:
        """``(N, K + 1)`` uniform random rows, column 0 the positive ``index``.

        Used when the loader gives no negatives; drawn on the memory's device.
        """
        idx = torch.randint(0, self.num_data, (index.shape[0], self.k + 1), device=self.memory_v1.device)
        idx[:, 0] = index
        return idx

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, index: torch.Tensor,
                contrast_index: Optional[torch.Tensor] = None):
        """Scores of ``v1`` (student, ``(N, dim)``) against the teacher bank and of
        ``v2`` (teacher) against the student bank, each ``(N, K + 1)``; then update
        both banks at rows ``index``."""
        temperature = float(self.params[1])
        momentum = float(self.params[4])
        mem1, mem2 = self.memory_v1, self.memory_v2
        v1 = v1.to(mem1.dtype)
        v2 = v2.to(mem2.dtype)
        index = index.to(mem1.device).long().view(-1)
        if contrast_index is None:
            contrast_index = self.sample_indices(index)
        contrast_index = contrast_index.to(mem1.device).long()
        n, k1 = contrast_index.shape
        rows = contrast_index.reshape(-1)

        # exp(<v, m> / 0.07) spans ~e^-14..e^14: kept in the memory's precision under autocast.
        with torch.autocast(device_type=mem1.device.type, enabled=False):
            w1 = mem1.index_select(0, rows).view(n, k1, -1)
            out_v2 = torch.exp(torch.bmm(w1, v2.unsqueeze(2)).squeeze(2) / temperature)
            w2 = mem2.index_select(0, rows).view(n, k1, -1)
            out_v1 = torch.exp(torch.bmm(w2, v1.unsqueeze(2)).squeeze(2) / temperature)

        # Z ~ the partition function, estimated once by Monte Carlo on the first batch.
        if float(self.params[2]) < 0:
            self.params[2] = out_v1.detach().mean() * self.num_data
        if float(self.params[3]) < 0:
            self.params[3] = out_v2.detach().mean() * self.num_data
        out_v1 = out_v1 / float(self.params[2])
        out_v2 = out_v2 / float(self.params[3])

        with torch.no_grad():
            v1, v2, index = _gather_across_processes(v1.detach(), v2.detach(), index)
            for mem, v in ((mem1, v1), (mem2, v2)):
                pos = mem.index_select(0, index).mul_(momentum).add_(v * (1 - momentum))
                mem.index_copy_(0, index, pos / pos.pow(2).sum(1, keepdim=True).sqrt())
        return out_v1, out_v2


def _gather_across_processes(*tensors: torch.Tensor):
    """Under ``torch.distributed``, every process's batch, so all copies of the banks stay equal.

    (DistributedDataParallel broadcasts buffers from process 0 at each forward;
    without this, the rows other processes wrote would be lost.)
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


@register_distiller("CRD")
class CRD(Distiller):
    contrastive = True  # its loaders add (index, contrastive_index) to each batch

    @staticmethod
    def add_config(cfg):
        from kd_cls.config import CfgNode as CN

        cfg.CRD = CN()
        cfg.CRD.MODE = "exact"  # "exact": the positive is the image itself; "relax": any image of its class
        cfg.CRD.FEAT = CN()
        cfg.CRD.FEAT.DIM = 128
        cfg.CRD.FEAT.STUDENT_DIM = 256
        cfg.CRD.FEAT.TEACHER_DIM = 256
        cfg.CRD.LOSS = CN()
        cfg.CRD.LOSS.CE_WEIGHT = 1.0
        cfg.CRD.LOSS.FEAT_WEIGHT = 0.8
        cfg.CRD.NCE = CN()
        cfg.CRD.NCE.K = 16384
        cfg.CRD.NCE.MOMENTUM = 0.5
        cfg.CRD.NCE.TEMPERATURE = 0.07

    def __init__(self, student, teacher, cfg, num_data=None):
        super().__init__(student, teacher, cfg)
        if num_data is None:
            raise ValueError("CRD needs num_data (the training-set size, i.e. the memory size)")
        if cfg.CRD.MODE not in ("exact", "relax"):
            raise ValueError(f"CRD.MODE {cfg.CRD.MODE!r} is not valid; choose 'exact' or 'relax'")
        self.ce_loss_weight = cfg.CRD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.CRD.LOSS.FEAT_WEIGHT
        self.student_dim = cfg.CRD.FEAT.STUDENT_DIM
        self.teacher_dim = cfg.CRD.FEAT.TEACHER_DIM
        self.num_data = int(num_data)
        self.embed_s = Embed(self.student_dim, cfg.CRD.FEAT.DIM)
        self.embed_t = Embed(self.teacher_dim, cfg.CRD.FEAT.DIM)
        self.contrast = ContrastMemory(
            cfg.CRD.FEAT.DIM, self.num_data, cfg.CRD.NCE.K, cfg.CRD.NCE.TEMPERATURE, cfg.CRD.NCE.MOMENTUM
        )
        self._tap_s = [get_taps(student)["pooled_feat"]]
        self._tap_t = [get_taps(teacher)["pooled_feat"]]

    def extra_modules(self):
        return [self.embed_s, self.embed_t]

    def get_extra_parameters(self) -> int:
        # As mdistiller counts: the embeddings plus every buffer of the memory (two banks, 5 constants).
        return super().get_extra_parameters() + count_params(self.contrast.buffers())

    def check_shapes(self, image_size: int) -> None:
        (s,), (t,) = feature_pair_shapes(self.student, self.teacher, self._tap_s, self._tap_t, (image_size,) * 2)
        self._check_dim(torch.empty(s), self.student_dim, "CRD.FEAT.STUDENT_DIM", "student")
        self._check_dim(torch.empty(t), self.teacher_dim, "CRD.FEAT.TEACHER_DIM", "teacher")

    @staticmethod
    def _check_dim(feat: torch.Tensor, expected: int, key: str, model: str):
        got = feat[0].numel()
        if got != expected:
            raise ValueError(f"CRD: the {model}'s pooled feature has {got} values but {key} is {expected}; "
                             f"set {key} {got}")

    def crd_loss(self, f_s, f_t, index, contrastive_index=None):
        v1 = self.embed_s(f_s)
        v2 = self.embed_t(f_t)
        out_s, out_t = self.contrast(v1, v2, index, contrastive_index)
        return crd_nce_loss(out_s, self.num_data) + crd_nce_loss(out_t, self.num_data)

    def forward_train(self, image, target, index=None, contrastive_index=None, **kwargs):
        if index is None:
            raise ValueError("CRD needs each sample's dataset index; set SOLVER.TRAINER to 'crd' or 'crd_dot'")
        logits_s, (f_s,) = self.run_student(image, self._tap_s)
        _, (f_t,) = self.run_teacher(image, self._tap_t)
        self._check_dim(f_s, self.student_dim, "CRD.FEAT.STUDENT_DIM", "student")
        self._check_dim(f_t, self.teacher_dim, "CRD.FEAT.TEACHER_DIM", "teacher")
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_s, target)
        loss_kd = self.feat_loss_weight * self.crd_loss(f_s, f_t, index, contrastive_index)
        return logits_s, {"loss_ce": loss_ce, "loss_kd": loss_kd}
