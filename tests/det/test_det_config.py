"""kd_det configuration: defaults, teacher derivation, our configs vs mdistiller's (no model is built)."""
import glob
import os

import pytest

pytest.importorskip("detectron2")

from kd_det.testing import kd_config_names  # noqa: E402

from kd_det.config import ConfigError, add_kd_config, build_teacher_cfg, get_kd_cfg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET_CFGS = os.path.join(REPO, "configs", "detection")
KD_CONFIGS = kd_config_names(DET_CFGS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_twelve_mirrored_configs_exist():
    names = {os.path.basename(p)[:-5] for p in KD_CONFIGS}
    expected = {
        f"{m}-{pair}"
        for m in ("DKD", "ReviewDKD", "ReviewKD")
        for pair in ("MV2-R50", "R18-R101", "R50-R101")
    } | {f"ReviewKD-{pair}-Mask" for pair in ("MV2-R50", "R18-R101", "R50-R101")}
    assert names == expected


def test_defaults_follow_mdistiller():
    from detectron2.config import get_cfg

    cfg = add_kd_config(get_cfg())
    assert cfg.KD.TYPE == "DKD"
    assert (cfg.KD.DKD.ALPHA, cfg.KD.DKD.BETA, cfg.KD.DKD.T) == (1.0, 0.25, 1.0)
    assert cfg.KD.REVIEWKD.LOSS_WEIGHT == 1.0
    assert cfg.TEACHER.INPUT.FORMAT == "BGR"
    assert list(cfg.TEACHER.MODEL.PIXEL_MEAN) == [103.530, 116.280, 123.675]
    assert list(cfg.TEACHER.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    assert cfg.MODEL.MOBILENETV2.NORM == "FrozenBN"
    # No copy of detectron2's defaults under TEACHER.
    assert set(cfg.TEACHER.keys()) == {"CONFIG_FILE", "MODEL", "INPUT"}


@pytest.mark.parametrize(
    "name, student_depth, teacher_depth, kd_type, weight, mask",
    [
        ("ReviewKD/ReviewKD-R18-R101.yaml", 18, 101, "ReviewKD", 1.2, False),
        ("ReviewKD/ReviewKD-R50-R101-Mask.yaml", 50, 101, "ReviewKD", 0.8, True),
        ("DKD/ReviewDKD-MV2-R50.yaml", None, 50, "ReviewDKD", 2.0, False),
        ("DKD/DKD-R18-R101.yaml", 18, 101, "DKD", 1.0, False),
    ],
)
def test_config_values(name, student_depth, teacher_depth, kd_type, weight, mask):
    cfg = get_kd_cfg(os.path.join(DET_CFGS, name))
    t = build_teacher_cfg(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == "RCNNKD"
    assert cfg.KD.TYPE == kd_type and cfg.KD.REVIEWKD.LOSS_WEIGHT == weight
    assert cfg.MODEL.MASK_ON is mask and t.MODEL.MASK_ON is False
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (8, 0.01, 180000)
    assert tuple(cfg.SOLVER.STEPS) == (120000, 160000)
    assert t.MODEL.RESNETS.DEPTH == teacher_depth
    assert t.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert t.INPUT.FORMAT == "BGR" and list(t.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    if student_depth == 18:
        assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
        assert list(cfg.MODEL.PIXEL_STD) == [57.375, 57.120, 58.395]
    if student_depth is None:
        assert cfg.MODEL.BACKBONE.NAME == "build_mobilenetv2_fpn_backbone"
        assert list(cfg.MODEL.FPN.IN_FEATURES) == ["m2", "m3", "m4", "m5"]


def test_teacher_takes_device_datasets_and_classes_from_student():
    cfg = get_kd_cfg(
        os.path.join(DET_CFGS, "ReviewKD", "ReviewKD-R50-R101.yaml"),
        ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3", "DATASETS.TRAIN", "('shapes_train',)"],
    )
    t = build_teacher_cfg(cfg)
    assert t.MODEL.DEVICE == "cpu"
    assert t.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert tuple(t.DATASETS.TRAIN) == ("shapes_train",)
    assert tuple(t.DATASETS.TEST) == ("coco_2017_val",)


def test_class_count_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="class-count mismatch.*NUM_CLASSES=5.*80"):
        get_kd_cfg(
            os.path.join(DET_CFGS, "ReviewKD", "ReviewKD-R50-R101.yaml"), ["TEACHER.MODEL.ROI_HEADS.NUM_CLASSES", "5"]
        )


def test_unknown_kd_type_lists_choices():
    with pytest.raises(ConfigError, match="unknown KD.TYPE 'FitNet'.*ReviewKD, DKD, ReviewDKD"):
        get_kd_cfg(os.path.join(DET_CFGS, "DKD", "DKD-R50-R101.yaml"), ["KD.TYPE", "FitNet"])


def test_teacher_override_from_command_line_and_typo():
    path = os.path.join(DET_CFGS, "DKD", "DKD-R50-R101.yaml")
    cfg = get_kd_cfg(path, ["TEACHER.MODEL.RESNETS.DEPTH", "50", "TEACHER.MODEL.FPN.OUT_CHANNELS", "128"])
    t = build_teacher_cfg(cfg)
    assert t.MODEL.RESNETS.DEPTH == 50 and t.MODEL.FPN.OUT_CHANNELS == 128
    with pytest.raises(ConfigError, match="TEACHER.MODEL.RESNET.DEPTH"):
        get_kd_cfg(path, ["TEACHER.MODEL.RESNET.DEPTH", "50"])


def test_teacher_config_file_and_declared_key_precedence(tmp_path):
    teacher_file = tmp_path / "teacher.yaml"
    teacher_file.write_text(
        f'_BASE_: "{os.path.join(DET_CFGS, "COCO-Detection", "faster_rcnn_R_18_FPN_3x.yaml")}"\n'
        "MODEL:\n  WEIGHTS: teacher.pth\n"
    )
    base = os.path.join(DET_CFGS, "DKD", "DKD-R50-R101.yaml")
    # The file's R-18 settings (RGB, torchvision std) survive the TEACHER node's untouched defaults;
    # the file's depth loses to the config's TEACHER.MODEL.RESNETS.DEPTH 101.
    t = build_teacher_cfg(get_kd_cfg(base, ["TEACHER.CONFIG_FILE", str(teacher_file)]))
    assert t.INPUT.FORMAT == "RGB"
    assert list(t.MODEL.PIXEL_STD) == [57.375, 57.120, 58.395]
    # The file's MODEL.WEIGHTS is its recipe's initialisation, never the teacher's weights.
    assert t.MODEL.WEIGHTS == ""
    assert t.MODEL.RESNETS.DEPTH == 101
    # An explicit TEACHER key that differs from detectron2's default wins over the file.
    t = build_teacher_cfg(
        get_kd_cfg(base, ["TEACHER.CONFIG_FILE", str(teacher_file), "TEACHER.INPUT.FORMAT", "BGR", "TEACHER.MODEL.WEIGHTS", "x.pkl"])
    )
    assert t.MODEL.WEIGHTS == "x.pkl"
    assert t.INPUT.FORMAT == "RGB"  # BGR is detectron2's default, so it does not override the file


def test_missing_teacher_config_file_is_named():
    with pytest.raises(FileNotFoundError, match="TEACHER.CONFIG_FILE not found: nowhere.yaml"):
        get_kd_cfg(os.path.join(DET_CFGS, "DKD", "DKD-R50-R101.yaml"), ["TEACHER.CONFIG_FILE", "nowhere.yaml"])


def test_baseline_configs_load():
    for path in glob.glob(os.path.join(DET_CFGS, "COCO-*", "*.yaml")):
        cfg = get_kd_cfg(path)
        arch = {"retinanet": "RetinaNet", "fcos": "FCOS"}.get(os.path.basename(path).split("_")[0], "GeneralizedRCNN")
        assert cfg.MODEL.META_ARCHITECTURE == arch
        assert cfg.MODEL.MASK_ON is ("mask_rcnn" in path)


MDISTILLER = os.environ.get("MDISTILLER_ROOT", "")


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


@pytest.mark.skipif(not MDISTILLER, reason="set MDISTILLER_ROOT to an mdistiller checkout to compare configs")
@pytest.mark.parametrize("name", KD_CONFIGS)
def test_same_effective_config_as_mdistiller(name):
    ours = get_kd_cfg(os.path.join(DET_CFGS, name))
    theirs = get_kd_cfg(os.path.join(MDISTILLER, "detection", "configs", name))
    a, b = _flat(ours), _flat(theirs)
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert not diff
    assert _flat(build_teacher_cfg(ours)) == _flat(build_teacher_cfg(theirs))
