"""RetinaNet and FCOS as yacs detectors: configs, kd_det.modeling.fcos, detectron2's model zoo.

CPU only, tiny images (64x96), one torch thread. The FCOS reference is
detectron2 v0.6's LazyConfig ``COCO-Detection/fcos_R_50_FPN_1x.py``, read from
the installed model zoo (``tools/install_detectron2.sh`` puts it there).
"""
import inspect
import math
import os

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401  (registers the placeholder ops before detectron2 is used)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_model  # noqa: E402
from detectron2.modeling.meta_arch.fcos import FCOS as D2FCOS  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_cls.config import ConfigError  # noqa: E402
from kd_det.config import add_kd_config  # noqa: E402
from kd_det.modeling.fcos import FCOS, add_fcos_config, group_norm_32  # noqa: E402
from kd_det.testing import TINY_OPTS, synthetic_batch, torch_threads  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET = os.path.join(REPO, "configs", "detection")
RETINANET = ["retinanet_R_18_FPN_3x", "retinanet_R_50_FPN_3x", "retinanet_R_101_FPN_3x"]
FCOS_CFGS = ["fcos_R_18_FPN_1x", "fcos_R_50_FPN_1x", "fcos_R_101_FPN_1x"]
LOSSES = {
    "RetinaNet": {"loss_cls", "loss_box_reg"},  # detectron2/modeling/meta_arch/retinanet.py, RetinaNet.losses
    "FCOS": {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"},  # .../meta_arch/fcos.py, FCOS.losses
}
# The keys in which the R-18 configs differ from their R-50 siblings, as in
# faster_rcnn_R_18_FPN_3x.yaml (a torchvision-style ResNet-18: RGB, ImageNet std).
R18_KEYS = {
    "INPUT.FORMAT", "MODEL.WEIGHTS", "MODEL.PIXEL_STD", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.RES2_OUT_CHANNELS"
}
NOT_INSTALLED = (
    "detectron2's model-zoo configs are not installed in this environment; "
    "run tools/install_detectron2.sh (PYTHON=<env python>) to copy them from the sdist"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _path(name):
    return os.path.join(DET, "COCO-Detection", name + ".yaml")


def _cfg(name, *opts, tiny=True):
    """The config file ``name`` on detectron2's + kd_det's defaults; with ``tiny``, TINY_OPTS on top."""
    cfg = get_cfg()
    add_kd_config(cfg)
    add_fcos_config(cfg)
    cfg.merge_from_file(_path(name))
    cfg.merge_from_list((TINY_OPTS if tiny else []) + list(opts))
    return cfg


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _diff(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    return {k for k in fa if fa[k] != fb[k]}


def _zoo_file(name):
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        pytest.skip(NOT_INSTALLED)


@pytest.fixture(scope="module")
def lazy_fcos():
    """detectron2's LazyConfig fcos_R_50_FPN_1x.py (config) and the model it instantiates."""
    from detectron2.config import LazyConfig, instantiate

    lazy = LazyConfig.load(_zoo_file("COCO-Detection/fcos_R_50_FPN_1x.py"))
    assert lazy.model.head.norm == "GN"
    # detectron2 0.6's RetinaNetHead probes get_norm(norm, 1), which current torch refuses for
    # "GN" (GroupNorm(32, 1)); the same GroupNorm(32, C) layers, built by kd_det's callable.
    model_cfg = lazy.model
    model_cfg.head.norm = group_norm_32
    torch.manual_seed(0)
    model = instantiate(model_cfg)
    lazy.model.head.norm = "GN"
    return lazy, model


# --------------------------------------------------------------------------- configs train


@pytest.mark.parametrize("name", RETINANET + FCOS_CFGS)
def test_config_trains_one_step_and_infers(name):
    from detectron2.solver import build_optimizer

    cfg = _cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    family = cfg.MODEL.META_ARCHITECTURE
    assert type(model).__name__ == family
    if family == "FCOS":
        assert isinstance(model, FCOS) and isinstance(model, D2FCOS)
    opt = build_optimizer(cfg, model)
    head_w = model.head.cls_score.weight.detach().clone()
    with EventStorage():
        losses = model(synthetic_batch())
    assert set(losses) == LOSSES[family]
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(model.head.cls_score.weight, head_w)

    model.eval()
    with torch.no_grad():
        out = model(synthetic_batch(2, seed=1))
    assert len(out) == 2
    for o in out:
        inst = o["instances"]
        assert inst.image_size == (64, 96)
        assert all(inst.has(f) for f in ("pred_boxes", "scores", "pred_classes"))
        assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE


# --------------------------------------------------------------------------- FCOS module


def test_add_fcos_config_is_idempotent():
    cfg = get_cfg()
    assert add_fcos_config(cfg) is cfg
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    assert add_fcos_config(cfg) is cfg and cfg.MODEL.FCOS.NUM_CLASSES == 3
    # add_kd_config and add_fcos_config compose in either order.
    cfg2 = add_kd_config(add_fcos_config(get_cfg()))
    cfg3 = add_fcos_config(add_kd_config(get_cfg()))
    assert cfg2 == cfg3


def test_fcos_defaults_are_the_official_values():
    """MODEL.FCOS defaults = detectron2 v0.6's FCOS LazyConfig + ``FCOS.__init__`` (literal values)."""
    f = add_fcos_config(get_cfg()).MODEL.FCOS
    # configs/common/models/retinanet.py: num_classes=80, head_in_features=["p3".."p7"],
    # conv_dims=[256]*4, prior_prob=0.01, focal_loss_alpha=0.25, focal_loss_gamma=2.0.
    assert f.NUM_CLASSES == 80
    assert f.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert f.NUM_CONVS == 4 and f.PRIOR_PROB == 0.01
    assert f.FOCAL_LOSS_ALPHA == 0.25 and f.FOCAL_LOSS_GAMMA == 2.0
    # configs/common/models/fcos.py: head.norm = "GN", test_score_thresh = 0.2,
    # test_nms_thresh = 0.6, top_block.in_feature = "p5".
    assert f.NORM == "GN" and f.SCORE_THRESH_TEST == 0.2 and f.NMS_THRESH_TEST == 0.6
    assert f.TOP_BLOCK_IN_FEATURE == "p5"
    # detectron2/modeling/meta_arch/fcos.py, FCOS.__init__: the defaults the LazyConfig keeps.
    sig = inspect.signature(D2FCOS.__init__).parameters
    assert f.CENTER_SAMPLING_RADIUS == sig["center_sampling_radius"].default == 1.5
    assert f.TOPK_CANDIDATES_TEST == sig["test_topk_candidates"].default == 1000
    d2 = get_cfg()
    assert d2.TEST.DETECTIONS_PER_IMAGE == sig["max_detections_per_image"].default == 100
    # Base-FCOS.yaml spells out the same values.
    assert _cfg("fcos_R_50_FPN_1x").MODEL.FCOS == f


def test_yacs_fcos_equals_lazyconfig_fcos(lazy_fcos):
    lazy, ref = lazy_fcos
    cfg = _cfg("fcos_R_50_FPN_1x")
    # The recipe as merged: TINY_OPTS change only the input size and solver, not the model.
    torch.manual_seed(0)
    ours = build_model(cfg)
    assert type(ref) is D2FCOS and type(ours) is FCOS
    for attr in (
        "num_classes", "head_in_features", "focal_loss_alpha", "focal_loss_gamma", "center_sampling_radius",
        "test_score_thresh", "test_topk_candidates", "test_nms_thresh", "max_detections_per_image",
    ):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert type(ours.box2box_transform) is type(ref.box2box_transform)
    assert ours.box2box_transform.normalize_by_size == ref.box2box_transform.normalize_by_size
    torch.testing.assert_close(ours.pixel_mean, ref.pixel_mean)
    torch.testing.assert_close(ours.pixel_std, ref.pixel_std)
    assert ours.anchor_generator.strides == ref.anchor_generator.strides == [8, 16, 32, 64, 128]
    for a, b in zip(ours.anchor_generator.cell_anchors, ref.anchor_generator.cell_anchors):
        torch.testing.assert_close(a, b)
    # Input format: the LazyConfig's model has none (fcos.py deletes it); its data uses BGR.
    assert ours.input_format == lazy.dataloader.train.mapper.image_format == "BGR"

    # Head: same layers (4 convs + GroupNorm(32, 256) + ReLU per branch), prior-prob bias.
    assert repr(ours.head) == repr(ref.head)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in ours.head.cls_subnet)
    gns = [m for m in ours.head.cls_subnet if isinstance(m, torch.nn.GroupNorm)]
    assert n_convs == 4 and len(gns) == 4 and all(g.num_groups == 32 and g.num_channels == 256 for g in gns)
    bias = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(ours.head.cls_score.bias, torch.full_like(ours.head.cls_score.bias, bias))
    torch.testing.assert_close(ref.head.cls_score.bias, torch.full_like(ref.head.cls_score.bias, bias))

    # Backbone: same modules (ResNet-50, FrozenBN, FPN, P6/P7 from P5), same frozen parameters.
    assert repr(ours.backbone) == repr(ref.backbone)
    assert ours.backbone.top_block.in_feature == ref.backbone.top_block.in_feature == "p5"
    assert ours.backbone.output_shape() == ref.backbone.output_shape()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    frozen = {k for k, p in ours.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {k for k, p in ref.named_parameters() if not p.requires_grad}


def test_fcos_training_recipe_matches_lazyconfig(lazy_fcos):
    """Base-FCOS.yaml's SOLVER/INPUT/DATASETS keys give what fcos_R_50_FPN_1x.py's optimizer,
    lr_multiplier, dataloader and train give."""
    from detectron2.config import instantiate
    from detectron2.data.detection_utils import build_augmentation
    from detectron2.solver import build_lr_scheduler, build_optimizer

    lazy, _ = lazy_fcos
    cfg = get_cfg()
    add_fcos_config(cfg)
    cfg.merge_from_file(_path("fcos_R_50_FPN_1x"))
    s, o = cfg.SOLVER, lazy.optimizer
    assert o._target_ is torch.optim.SGD
    assert (s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM, s.NESTEROV) == (
        o.lr, o.momentum, o.weight_decay, o.params.weight_decay_norm, False
    )
    assert s.MAX_ITER == lazy.train.max_iter and s.CHECKPOINT_PERIOD == lazy.train.checkpointer.period
    # The LR multiplier, iteration by iteration (warm-up, both decays, the end).
    tiny = torch.nn.Linear(1, 1)
    ours = build_lr_scheduler(cfg, build_optimizer(cfg, tiny))._multiplier
    ref = instantiate(lazy.lr_multiplier)
    for it in (0, 1, 500, 999, 1000, 1001, 59999, 60000, 79999, 80000, 89999):
        assert ours(it / s.MAX_ITER) == pytest.approx(ref(it / lazy.train.max_iter), rel=1e-9), it

    def sig(augs):
        out = []
        for a in augs:
            d = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in vars(a).items()}
            if len(set(d.get("short_edge_length", ()))) == 1:
                # One size (test time: (800, 800)): "choice" and "range" both always give it.
                d.pop("sample_style"), d.pop("is_range")
            out.append((type(a).__name__, d))
        return out

    train_map, test_map = lazy.dataloader.train.mapper, lazy.dataloader.test.mapper
    assert sig(build_augmentation(cfg, True)) == sig(instantiate(train_map.augmentations))
    assert sig(build_augmentation(cfg, False)) == sig(instantiate(test_map.augmentations))
    assert cfg.INPUT.FORMAT == train_map.image_format
    assert cfg.MODEL.MASK_ON == train_map.use_instance_mask is False
    assert s.IMS_PER_BATCH == lazy.dataloader.train.total_batch_size
    assert cfg.DATASETS.TRAIN == (lazy.dataloader.train.dataset.names,)
    assert cfg.DATASETS.TEST == (lazy.dataloader.test.dataset.names,)
    assert cfg.MODEL.WEIGHTS == lazy.train.init_checkpoint
    assert cfg.MODEL.BACKBONE.FREEZE_AT == lazy.model.backbone.bottom_up.freeze_at


def test_fcos_variants_differ_only_in_depth_and_input():
    r50 = _cfg("fcos_R_50_FPN_1x", tiny=False)
    assert _diff(_cfg("fcos_R_101_FPN_1x", tiny=False), r50) == {"MODEL.WEIGHTS", "MODEL.RESNETS.DEPTH"}
    assert _diff(_cfg("fcos_R_18_FPN_1x", tiny=False), r50) == R18_KEYS


def test_fcos_kwargs_construction_and_errors():
    cfg = _cfg("fcos_R_18_FPN_1x")
    # The configurable __init__ also takes plain keyword arguments, as detectron2's FCOS does.
    args = FCOS.from_config(cfg)
    model = FCOS(**args)
    assert model.input_format == "RGB" and model.vis_period == 0
    assert META_ARCH_REGISTRY.get("FCOS") is FCOS
    with pytest.raises(ConfigError, match="RES2_OUT_CHANNELS 64"):
        build_model(_cfg("fcos_R_18_FPN_1x", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"))
    with pytest.raises(ValueError, match="has no \\['p8'\\]"):
        build_model(_cfg("fcos_R_18_FPN_1x", "MODEL.FCOS.IN_FEATURES", "['p3', 'p8']"))
    plain = get_cfg()
    plain.MODEL.META_ARCHITECTURE = "FCOS"
    with pytest.raises(KeyError, match="add_fcos_config"):
        build_model(plain)


# --------------------------------------------------------------------------- RetinaNet configs


@pytest.mark.parametrize("name", ["retinanet_R_50_FPN_3x", "retinanet_R_101_FPN_3x"])
def test_retinanet_configs_equal_detectron2s(name):
    ours = get_cfg()
    ours.merge_from_file(_path(name))
    ref = get_cfg()
    ref.merge_from_file(_zoo_file(f"COCO-Detection/{name}.yaml"))
    assert _diff(ours, ref) == set()


def test_r18_configs_follow_faster_rcnn_r18():
    frcnn = get_cfg()
    frcnn.merge_from_file(_path("faster_rcnn_R_18_FPN_3x"))
    for name, sibling in (("retinanet_R_18_FPN_3x", "retinanet_R_50_FPN_3x"), ("fcos_R_18_FPN_1x", "fcos_R_50_FPN_1x")):
        r18, r50 = _cfg(name, tiny=False), _cfg(sibling, tiny=False)
        assert _diff(r18, r50) == R18_KEYS, name
        flat, ref = _flat(r18), _flat(frcnn)
        assert {k: flat[k] for k in R18_KEYS} == {k: ref[k] for k in R18_KEYS}, name


def test_model_zoo_config_file():
    path = _zoo_file("COCO-Detection/retinanet_R_50_FPN_3x.yaml")
    assert os.path.isfile(path)
    assert os.path.isfile(_zoo_file("COCO-Detection/fcos_R_50_FPN_1x.py"))


# --------------------------------------------------------------------------- FPN levels


@pytest.mark.parametrize(
    "name, top_in, top_in_channels",
    [
        ("retinanet_R_18_FPN_3x", "res5", 512),  # P6 from C5: build_retinanet_resnet_fpn_backbone
        ("retinanet_R_50_FPN_3x", "res5", 2048),
        ("fcos_R_18_FPN_1x", "p5", 256),  # P6 from P5: configs/common/models/fcos.py
        ("fcos_R_50_FPN_1x", "p5", 256),
    ],
)
def test_fpn_levels_p3_to_p7(name, top_in, top_in_channels):
    bb = build_backbone(_cfg(name))
    strides = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    shapes = {k: (s.channels, s.stride) for k, s in bb.output_shape().items()}
    assert shapes == {k: (256, v) for k, v in strides.items()}
    assert bb.top_block.in_feature == top_in and bb.top_block.p6.in_channels == top_in_channels
    with torch.no_grad():
        out = bb(torch.zeros(1, 3, 128, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (1, 256, 128 // s, 256 // s) for k, s in strides.items()
    }


def test_fcos_backbone_with_res5_top_block_is_retinanets():
    retina = build_backbone(_cfg("retinanet_R_18_FPN_3x"))
    fcos_res5 = build_backbone(
_cfg("fcos_R_18_FPN_1x", "MODEL.FCOS.TOP_BLOCK_IN_FEATURE", "res5"))
    assert repr(fcos_res5) == repr(retina)
