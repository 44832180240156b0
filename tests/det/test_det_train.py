"""Training through tools/train_net.py's trainer: every distillation config, resume, student export."""
import math
import os

import pytest
import torch

pytest.importorskip("detectron2")

from kd_det.testing import kd_config_names  # noqa: E402

import kd_det  # noqa: E402,F401
from kd_cls.checkpoint_io import CheckpointError  # noqa: E402
from kd_det.config import get_kd_cfg  # noqa: E402
from kd_det.data import register_builtin_coco  # noqa: E402
from kd_det.data.shapes import make_shapes_dataset  # noqa: E402
from kd_det.engine import STUDENT_FILE, KDTrainer  # noqa: E402
from kd_det.testing import TINY_OPTS  # noqa: E402
from kd_cls.testing import load_script  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET_CFGS = os.path.join(REPO, "configs", "detection")
KD_CONFIGS = kd_config_names(DET_CFGS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """The shapes dataset with COCO's categories, laid out as COCO 2017 under DETECTRON2_DATASETS."""
    root = str(tmp_path_factory.mktemp("datasets"))
    make_shapes_dataset(root, num_train=6, num_val=3, image_size=64, categories="coco")
    mp = pytest.MonkeyPatch()
    mp.setenv("DETECTRON2_DATASETS", root)
    register_builtin_coco()  # detectron2 read the variable at import; point its builtins at it again
    yield root
    mp.undo()
    register_builtin_coco()


def _train(cfg):
    torch.manual_seed(0)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


MDISTILLER = os.environ.get("MDISTILLER_ROOT", "")


@pytest.mark.parametrize("name", KD_CONFIGS)
def test_config_trains_two_iterations(name, coco_root, tmp_path):
    _check_two_iterations(os.path.join(DET_CFGS, name), tmp_path)


@pytest.mark.skipif(not MDISTILLER, reason="set MDISTILLER_ROOT to an mdistiller checkout to train its own configs")
@pytest.mark.parametrize("name", KD_CONFIGS)
def test_mdistiller_config_trains_two_iterations(name, coco_root, tmp_path):
    _check_two_iterations(os.path.join(MDISTILLER, "detection", "configs", name), tmp_path)


def _check_two_iterations(path, tmp_path):
    # DATASETS.TEST (): skip the evaluation at the end of training (covered below).
    cfg = get_kd_cfg(path, TINY_OPTS + ["OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", "()"])
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",)
    trainer = _train(cfg)
    hist = trainer.storage.histories()
    expected = {"ReviewKD": ["loss_reviewkd"], "DKD": ["loss_dkd"], "ReviewDKD": ["loss_reviewkd", "loss_dkd"]}
    keys = expected[cfg.KD.TYPE] + ["loss_cls", "loss_box_reg", "loss_rpn_cls"] + (["loss_mask"] if cfg.MODEL.MASK_ON else [])
    for k in keys:
        values = [v for v, _ in hist[k].values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (k, values)
    other = {"loss_reviewkd", "loss_dkd"} - set(expected[cfg.KD.TYPE])
    assert not other & set(hist)
    assert trainer.iter == 2  # the loop counter ends at MAX_ITER
    assert os.path.isfile(os.path.join(str(tmp_path), STUDENT_FILE))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _train_net():
    return load_script(os.path.join(REPO, "tools", "train_net.py"), "train_net")


@pytest.mark.slow
def test_resume_eval_and_student_file(coco_root, tmp_path):
    train_net = _train_net()
    out = str(tmp_path / "run")
    base = [
        "--config-file", os.path.join(DET_CFGS, "ReviewKD", "ReviewKD-R18-R101.yaml"),
    ]
    opts = TINY_OPTS + [
        "TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", out,
    ]
    train_net.main(train_net.build_parser().parse_args(base + opts))
    ckpt = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert ckpt["iteration"] == 1
    # The frozen teacher is not in the checkpoint, its source is: here a random teacher of a fixed seed.
    assert not [k for k in ckpt["model"] if k.startswith("teacher.")]
    assert ckpt["teacher_source"] == {"random_seed": 24301}
    assert oct(os.stat(os.path.join(out, "model_final.pth")).st_mode & 0o777) == oct(0o666 & ~_umask())

    # Resuming without KD.ALLOW_RANDOM_TEACHER cannot re-create that teacher: one line.
    refused = opts + ["SOLVER.MAX_ITER", "3", "KD.ALLOW_RANDOM_TEACHER", "False"]
    cfg = train_net.setup(train_net.build_parser().parse_args(base + ["--resume"] + refused))
    with pytest.raises(CheckpointError, match="random teacher"):
        KDTrainer(cfg).resume_or_load(resume=True)
    # With it, resume re-creates the same random teacher.
    cfg = train_net.setup(train_net.build_parser().parse_args(base + ["--resume"] + opts + ["SOLVER.MAX_ITER", "3"]))
    trainer = KDTrainer(cfg)
    first = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    again = KDTrainer.build_model(cfg).teacher.state_dict()
    assert all(torch.equal(v, again[k]) and torch.equal(v, first[k])
               for k, v in trainer.model.teacher.state_dict().items())
    trainer.train()
    assert trainer.iter == 3

    from kd_det.engine import evaluate_teacher

    res = evaluate_teacher(cfg, trainer.model)
    assert "AP" in res["bbox"]

    # The student-only file loads into a plain GeneralizedRCNN and evaluates.
    plain_cfg = get_kd_cfg(
        os.path.join(DET_CFGS, "ReviewKD", "ReviewKD-R18-R101.yaml"),
        opts + ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.WEIGHTS", os.path.join(out, STUDENT_FILE)],
    )
    plain = KDTrainer.build_model(plain_cfg)
    assert type(plain).__name__ == "GeneralizedRCNN"
    missing = plain.load_state_dict(torch.load(os.path.join(out, STUDENT_FILE))["model"], strict=True)
    assert not missing.missing_keys
    res = KDTrainer.test(plain_cfg, plain)
    assert set(res["bbox"]) >= {"AP", "AP50"}


def test_teacher_not_loaded_stops_training(coco_root, tmp_path):
    cfg = get_kd_cfg(
        os.path.join(DET_CFGS, "DKD", "DKD-R18-R101.yaml"),
        TINY_OPTS + ["KD.ALLOW_RANDOM_TEACHER", "False", "OUTPUT_DIR", str(tmp_path),
                     "TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"],
    )
    trainer = KDTrainer(cfg)
    with pytest.raises(kd_det.TeacherNotLoadedError, match="teacher is not loaded"):
        trainer.resume_or_load(resume=False)

