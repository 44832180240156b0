"""ImageNet / Tiny-ImageNet data and teachers, the configs of the DKD/DOT tables, and 2-step runs."""
import glob
import os

import pytest
import torch

from kd_cls.engine import get_cfg
from kd_cls.data import get_dataset_info
from kd_cls.distillers import build_distiller
from kd_cls.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(
    [os.path.join(REPO, "configs/cifar100", f) for f in ("crd.yaml", "reviewkd.yaml")]
    + glob.glob(os.path.join(REPO, "configs/cifar100/dot/*.yaml"))
    + glob.glob(os.path.join(REPO, "configs/imagenet/r34_r18/*.yaml"))
    + glob.glob(os.path.join(REPO, "configs/imagenet/r50_mv1/*.yaml"))
    + glob.glob(os.path.join(REPO, "configs/tiny_imagenet/dot/*.yaml"))
)


def _fake_trees():
    import kd_cls.testing

    return kd_cls.testing


def _load(path, opts=()):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def _rel(path):
    return os.path.relpath(path, os.path.join(REPO, "configs"))


# ----------------------------------------------------------------------------- configs
def test_config_set_is_complete():
    names = {_rel(p) for p in CONFIGS}
    assert len(names) == 2 + 3 + 6 + 7 + 2
    assert {"imagenet/r50_mv1/ofd.yaml", "tiny_imagenet/dot/r18_shuv2.yaml", "cifar100/dot/vgg13_vgg8.yaml"} <= names


# Values of the papers' recipes (mdistiller's files), spot-checked per config.
EXPECTED = {
    "cifar100/crd.yaml": {"SOLVER.TRAINER": "crd", "SOLVER.WEIGHT_DECAY": 0.0005, "CRD.NCE.K": 16384},
    "cifar100/reviewkd.yaml": {"REVIEWKD.REVIEWKD_WEIGHT": 5.0, "REVIEWKD.SHAPES": [1, 8, 16, 32]},
    "cifar100/dot/res32x4_shuv2.yaml": {"SOLVER.LR": 0.01, "SOLVER.DOT.DELTA": 0.075, "SOLVER.TRAINER": "dot",
                                        "EXPERIMENT.PROJECT": "dot_cifar"},
    "imagenet/r34_r18/dot.yaml": {"SOLVER.DOT.DELTA": 0.09, "KD.TEMPERATURE": 1, "KD.LOSS.CE_WEIGHT": 0.5,
                                  "SOLVER.BATCH_SIZE": 512, "SOLVER.LR_DECAY_STAGES": [30, 60, 90]},
    "imagenet/r34_r18/crd.yaml": {"SOLVER.BATCH_SIZE": 256, "SOLVER.LR": 0.1, "CRD.FEAT.TEACHER_DIM": 512},
    "imagenet/r50_mv1/dkd.yaml": {"DKD.BETA": 2.0, "DKD.T": 1.0, "DKD.WARMUP": 1},
    "imagenet/r50_mv1/ofd.yaml": {"SOLVER.BATCH_SIZE": 128, "OFD.LOSS.FEAT_WEIGHT": 0.0001},
    "imagenet/r50_mv1/reviewkd.yaml": {"REVIEWKD.MAX_MID_CHANNEL": 256, "REVIEWKD.REVIEWKD_WEIGHT": 8.0},
    "tiny_imagenet/dot/r18_mv2.yaml": {"SOLVER.EPOCHS": 200, "SOLVER.LR_DECAY_STAGES": [60, 120, 160],
                                       "DATASET.NUM_WORKERS": 16, "SOLVER.BATCH_SIZE": 256},
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, tuple) else cfg


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_values(name):
    cfg = _load(os.path.join(REPO, "configs", name))
    for key, value in EXPECTED[name].items():
        assert _get(cfg, key) == value, key


@pytest.fixture(scope="module")
def model_cache():
    cache = {}

    def get(name, dataset):
        if (name, dataset) not in cache:
            cache[(name, dataset)] = build_model(name, get_dataset_info(dataset).num_classes, dataset)
        return cache[(name, dataset)]

    return get


OFD_IMAGENET = os.path.join(REPO, "configs/imagenet/r50_mv1/ofd.yaml")


def _build_config(path, model_cache):
    from kd_cls.engine.trainers import get_trainer

    cfg = _load(path)
    ds = cfg.DATASET.TYPE
    student = model_cache(cfg.DISTILLER.STUDENT, ds)
    teacher = model_cache(cfg.DISTILLER.TEACHER, ds)
    # CRD's memory would hold one row per training image (1.28M on ImageNet): keep it small here.
    d = build_distiller(cfg, student, teacher, num_data=32)
    assert d.method_name == cfg.DISTILLER.TYPE, _rel(path)
    assert get_trainer(cfg.SOLVER.TRAINER) is not None
    last = [m for m in student.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    assert getattr(last, "out_features", getattr(last, "out_channels", None)) == get_dataset_info(ds).num_classes


def test_every_config_builds_its_distiller_and_models(model_cache):
    for path in CONFIGS:
        if path != OFD_IMAGENET:
            _build_config(path, model_cache)


def test_ofd_imagenet_config_builds(model_cache):
    # ImageNet ResNet50 lists 3 BNs before ReLU (layer2-4) for 4 pre-activation stages;
    # as in mdistiller, the last 3 stages of both models are paired.
    _build_config(OFD_IMAGENET, model_cache)


def test_tiny_shufflev2_runs_at_64px(model_cache):
    net = model_cache("ShuffleV2", "tiny_imagenet").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 200)


# ----------------------------------------------------------------------------- data
def test_tiny_imagenet_reads_val_annotations(tmp_path):
    mod = _fake_trees()
    base = mod.make_tiny_imagenet_tree(str(tmp_path), classes=3, per_class=2, val_per_class=2)
    from kd_cls.data.tiny_imagenet import val_samples

    # The generator lists val_0, val_1 under the first wnid, val_2, val_3 under the second, ...
    samples = val_samples(base, {"n10000000": 0, "n10000001": 1, "n10000002": 2})
    labels = {os.path.basename(p): t for p, t in samples}
    assert labels == {"val_0.JPEG": 0, "val_1.JPEG": 0, "val_2.JPEG": 1, "val_3.JPEG": 1,
                      "val_4.JPEG": 2, "val_5.JPEG": 2}


def test_missing_datasets_name_the_path(tmp_path):
    cfg = get_cfg()
    cfg.DATASET.ROOT = str(tmp_path)
    for name, folder in (("imagenet", "imagenet"), ("tiny_imagenet", "tiny-imagenet-200")):
        with pytest.raises(FileNotFoundError) as e:
            get_dataset_info(name).build(cfg, False)
        assert os.path.join(str(tmp_path), folder) in str(e.value) and "\n" not in str(e.value)


def test_imagenet_teacher_is_looked_up_in_torch_hub_cache(tmp_path):
    from kd_cls.models.pretrained import load_imagenet_teacher

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError) as e:
            load_imagenet_teacher("ResNet34", "imagenet", 1000)
        msg = str(e.value)
        assert os.path.join(str(tmp_path), "checkpoints", "resnet34-b627a593.pth") in msg
        assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in msg
        with pytest.raises(FileNotFoundError, match="DISTILLER.TEACHER_WEIGHTS"):
            load_imagenet_teacher("MobileNetV1", "imagenet", 1000)
    finally:
        torch.hub.set_dir(old)


# ----------------------------------------------------------------------------- 2-step runs
def _train(cfg_path, opts):
    from kd_cls.engine.cli import train_main

    common = ["SOLVER.BATCH_SIZE", "2", "DATASET.TEST.BATCH_SIZE", "2", "SOLVER.EPOCHS", "1",
              "DATASET.NUM_WORKERS", "0", "LOG.EVAL_TEACHER", "False", "LOG.PREFIX", "out", "LOG.WANDB", "False",
              # BN folding has its own tests; here it would only add a traced copy of the teacher.
              "SOLVER.FOLD_TEACHER_BN", "False"]
    assert train_main(["--cfg", os.path.join(REPO, cfg_path)] + opts + common) == 0
    logs = glob.glob("out/*/*/worklog.txt")
    assert len(logs) == 1
    text = open(logs[0]).read()
    assert "epoch: 1" in text and "best_acc" in text
    return os.path.dirname(logs[0])


def test_two_steps_at_32px_on_digits_with_crd_dot(in_tmp_cwd):
    # cifar100/crd.yaml on digits, optimised by DOT: 4 images, batch 2.
    torch.save({"model": build_model("resnet32x4", 10).state_dict()}, "teacher.pth")
    run = _train("configs/cifar100/crd.yaml", ["DATASET.TYPE", "digits", "DATASET.SUBSET", "4",
                                               "SOLVER.TRAINER", "crd_dot", "CRD.NCE.K", "2",
                                               "DISTILLER.TEACHER_WEIGHTS", "teacher.pth"])
    state = torch.load(os.path.join(run, "latest"), weights_only=True)
    assert state["model"]["module.contrast.memory_v1"].shape == (4, 128)
    opt = state["optimizer"]
    assert opt["param_groups"][0]["momentum"] == pytest.approx(0.825)
    assert any("momentum_kd_buffer" in s for s in opt["state"].values())


def test_two_steps_at_224px_on_an_imagefolder_tree(in_tmp_cwd):
    _fake_trees().make_imagenet_tree("data", classes=2, per_class=2, val_per_class=1)
    # The teacher comes from torch hub's cache under torchvision's file name.
    hub = os.path.abspath("hub")
    os.makedirs(os.path.join(hub, "checkpoints"))
    torch.save(build_model("ResNet34", 1000, "imagenet").state_dict(),
               os.path.join(hub, "checkpoints", "resnet34-b627a593.pth"))
    old = torch.hub.get_dir()
    torch.hub.set_dir(hub)
    try:
        _train("configs/imagenet/r34_r18/dot.yaml", [])
    finally:
        torch.hub.set_dir(old)


def test_two_steps_at_64px_on_a_tiny_imagenet_tree(in_tmp_cwd):
    _fake_trees().make_tiny_imagenet_tree("data", classes=2, per_class=2, val_per_class=1)
    # mdistiller's teacher location, relative to the working directory.
    os.makedirs("download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla")
    torch.save({"model": build_model("ResNet18", 200, "tiny_imagenet").state_dict()},
               "download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18")
    _train("configs/tiny_imagenet/dot/r18_shuv2.yaml", [])
