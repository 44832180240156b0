"""Distillation losses: plain functions of tensors, shared by kd_cls and kd_det.

One module per family; each lists its public names in ``__all__`` and is
re-exported here (``from kd_cls.losses import dkd_loss``). This package is the
ground floor: it imports nothing from the rest of the toolkit.
"""
from .contrastive import crd_nce_loss
from .cwd import cwd_loss
from .feature import at_loss, attention_map, hint_loss, match_spatial, nst_loss, ofd_loss, ofd_margins, vid_loss
from .fgd import FGDLoss
from .logit import dkd_loss, dkd_loss_parts, kd_loss
from .mgd import MGDLoss
from .pkd import pkd_loss
from .quality_focal import kd_quality_focal_loss
from .relation import kdsvd_loss, pkt_loss, rkd_loss, rkd_loss_parts, sp_loss
from .review import hcl_loss

__all__ = [
    "crd_nce_loss",
    "cwd_loss",
    "at_loss", "attention_map", "hint_loss", "match_spatial", "nst_loss", "ofd_loss", "ofd_margins", "vid_loss",
    "FGDLoss",
    "dkd_loss", "dkd_loss_parts", "kd_loss",
    "MGDLoss",
    "pkd_loss",
    "kd_quality_focal_loss",
    "kdsvd_loss", "pkt_loss", "rkd_loss", "rkd_loss_parts", "sp_loss",
    "hcl_loss",
]
