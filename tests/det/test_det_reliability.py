"""kd_det bad input is one line, exit 2, no OUTPUT_DIR; checkpoints hold the teacher's source, not its
tensors; TorchScript and the missing compiled ops behave as detectron2's."""
import os
import shutil

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
from detectron2.utils.events import EventStorage  # noqa: E402

from kd_cls.checkpoint_io import CheckpointError  # noqa: E402
from kd_det import build_kd_model, get_kd_cfg  # noqa: E402
from kd_det.compat import MissingCompiledOpError, using_placeholder_ops  # noqa: E402
from kd_det.data import register_shapes  # noqa: E402
from kd_det.data.shapes import make_shapes_dataset  # noqa: E402
from kd_det.testing import TINY_OPTS, synthetic_batch  # noqa: E402
from kd_cls.testing import default_sigint, load_script  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET = os.path.join(REPO, "configs", "detection")
R18_R101 = os.path.join(DET, "ReviewKD", "ReviewKD-R18-R101.yaml")
SHAPES = ["DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "('shapes_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "3"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_net():
    return load_script(os.path.join(REPO, "tools", "train_net.py"), "train_net")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_shapes_dataset(root, num_train=4, num_val=2, image_size=64)
    register_shapes(root)
    yield root
    register_shapes()


def _run(train_net, capsys, argv):
    code = train_net.run(train_net.build_parser().parse_args(argv))
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    return code, err


@pytest.mark.parametrize("opts, match", [
    (["KD.TYPE", "ReviewKDD"], "unknown KD.TYPE 'ReviewKDD'. Valid choices: ReviewKD, DKD, ReviewDKD"),
    (["KD.REVIEWKD.LOSS_WIEGHT", "2.0"], "unknown config key 'KD.REVIEWKD.LOSS_WIEGHT'. Did you mean KD.REVIEWKD.LOSS_WEIGHT"),
    (["TEACHER.MODEL.ROI_HEADS.NUM_CLASSES", "5"], "class-count mismatch"),
    (["TEACHER.MODEL.WEIGHTS", "absent/teacher.pkl", "KD.ALLOW_RANDOM_TEACHER", "False"],
     "TEACHER.MODEL.WEIGHTS file not found: absent/teacher.pkl"),
    (["MODEL.WEIGHTS", "", "KD.ALLOW_RANDOM_TEACHER", "False"], "the teacher would not be loaded"),
    (["KD.ALLOW_RANDOM_TEACHER", "False", "MODEL.WEIGHTS", "pretrained/r18-r101.pth"],
     "MODEL.WEIGHTS file not found: pretrained/r18-r101.pth"),
    (["DATASETS.TRAIN", "('shapes_tran',)"], "unknown dataset 'shapes_tran'. Did you mean 'shapes_train'"),
    (["DATASETS.TRAIN", "('coco_2017_train',)"], "coco_2017_train' needs"),
    (["TEACHER.CONFIG_FILE", "nowhere.yaml"], "TEACHER.CONFIG_FILE not found: nowhere.yaml"),
])
def test_bad_input_is_one_line_and_writes_nothing(train_net, shapes_root, tmp_path, capsys, monkeypatch, opts, match):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["--config-file", R18_R101] + TINY_OPTS + SHAPES + ["OUTPUT_DIR", str(out)] + opts
    code, err = _run(train_net, capsys, argv)
    errors = [l for l in err if l.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and match in errors[0], err
    assert not any("Traceback" in l for l in err)
    assert not out.exists()


RETINA = os.path.join(DET, "ReviewKD", "ReviewKD-RetinaNet-R18-R101.yaml")
RETINA_SHAPES = ["DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "('shapes_val',)",
                 "MODEL.RETINANET.NUM_CLASSES", "3", "TEACHER.MODEL.WEIGHTS", "", "KD.ALLOW_RANDOM_TEACHER", "True"]


@pytest.mark.parametrize("opts, match", [
    (["KD.METHODS", "['DKD']"], "KD method DKD does not serve a retinanet student"),
    (["KD.INHERIT", "['neck']"], "KD.INHERIT neck: student keys that do not match the teacher's: "
                                 "backbone.fpn_lateral3.weight (256, 128, 1, 1) vs (256, 512, 1, 1)"),
    (["KD.TYPE", "ReviewKD"], "are both set"),
])
def test_model_level_errors_come_before_output_dir(train_net, shapes_root, tmp_path, capsys, opts, match):
    out = tmp_path / "out"
    code, err = _run(train_net, capsys, ["--config-file", RETINA] + TINY_OPTS + RETINA_SHAPES +
                     ["OUTPUT_DIR", str(out)] + opts)
    errors = [l for l in err if l.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and match in errors[0], err
    assert not out.exists()


def test_missing_config_file_is_one_line(train_net, capsys, tmp_path):
    code, err = _run(train_net, capsys, ["--config-file", str(tmp_path / "none.yaml")])
    assert code == 2 and err[-1].startswith("error: config file not found")


def _files(out):
    return sorted(f for f in os.listdir(out) if f.endswith(".pth") and f.startswith("model_0"))


@pytest.mark.slow
def test_checkpoints_hold_the_teacher_source_not_its_tensors(train_net, shapes_root, tmp_path):
    # A real teacher file, random but saved once; an R-18 in place of the config's R-101 (the file's size is not
    # what this test is about).
    torch.manual_seed(3)
    small = ["TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    base = get_kd_cfg(R18_R101, TINY_OPTS + SHAPES + small)
    teacher_file = str(tmp_path / "teacher.pth")
    torch.save({"model": build_kd_model(base).teacher.state_dict()}, teacher_file)
    out = str(tmp_path / "run")
    opts = TINY_OPTS + SHAPES + small + ["KD.ALLOW_RANDOM_TEACHER", "False", "MODEL.WEIGHTS", "", "TEACHER.MODEL.WEIGHTS",
                                teacher_file, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2",
                                "DATASETS.TEST", "()", "OUTPUT_DIR", out]
    parse = train_net.build_parser().parse_args
    train_net.main(parse(["--config-file", R18_R101] + opts))
    saved = _files(out) + ["model_final.pth"]
    assert _files(out) == ["model_0000001.pth", "model_0000003.pth", "model_0000005.pth"]
    for name in saved:
        ckpt = torch.load(os.path.join(out, name), weights_only=False)
        assert not [k for k in ckpt["model"] if k.startswith("teacher.")], name
        assert ckpt["teacher_source"]["path"] == os.path.abspath(teacher_file)
        assert any(k.startswith("kd_trans.") for k in ckpt["model"])
        assert "optimizer" in ckpt["trainer"]["_trainer"] and "LRScheduler" in ckpt["trainer"]["hooks"]
    # Resume from the 4th iteration: the teacher comes back from its file and gives the same outputs.
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000003.pth")
    cfg = train_net.setup(parse(["--config-file", R18_R101, "--resume"] + opts[:-2] + ["OUTPUT_DIR", out,
                                                                                      "TEACHER.MODEL.WEIGHTS", ""]))
    trainer = train_net.KDTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    assert trainer.optimizer.state  # the momentum buffers came back too
    reference = build_kd_model(base).teacher
    reference.load_state_dict(torch.load(teacher_file)["model"])
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = trainer.model.teacher.backbone(x), reference.backbone(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A teacher file that changed, or is gone, is refused in one line.
    with open(teacher_file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="changed since the run started"):
        train_net.KDTrainer(cfg).resume_or_load(resume=True)
    os.remove(teacher_file)
    with pytest.raises(CheckpointError, match="are gone"):
        train_net.KDTrainer(cfg).resume_or_load(resume=True)


@pytest.mark.slow
def test_ctrl_c_and_stale_temporary_files(shapes_root, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    out.mkdir()
    (out / ".model_0000009.pth.tmp4242").write_bytes(b"partial")  # a write a kill interrupted
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", R18_R101] + TINY_OPTS + \
        SHAPES + ["TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                  "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "3",
                  "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS=shapes_root)
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    deadline = time.time() + 240
    while not (out / "model_0000002.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error: interrupted") and "--resume" in lines[-1]
    assert not any(l.startswith("Traceback") for l in lines)
    assert not (out / ".model_0000009.pth.tmp4242").exists()
    assert torch.load(str(out / "model_0000002.pth"), weights_only=False)["iteration"] == 2


def test_save_teacher_writes_the_teacher(tmp_path):
    from kd_det.checkpoint import KDCheckpointer

    torch.manual_seed(0)
    model = build_kd_model(get_kd_cfg(R18_R101, TINY_OPTS + ["TEACHER.MODEL.RESNETS.DEPTH", "18",
                                                              "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]))
    KDCheckpointer(model, str(tmp_path), save_teacher=True).save("combined")
    KDCheckpointer(model, str(tmp_path)).save("slim")
    combined = torch.load(str(tmp_path / "combined.pth"), weights_only=False)["model"]
    slim = torch.load(str(tmp_path / "slim.pth"), weights_only=False)["model"]
    assert {k for k in combined if k.startswith("teacher.")} == {"teacher." + k for k in model.teacher.state_dict()}
    assert set(slim) == {k for k in combined if not k.startswith("teacher.")}
    # A checkpoint holding the teacher restores it from its own tensors.
    other = build_kd_model(get_kd_cfg(R18_R101, TINY_OPTS + ["TEACHER.MODEL.RESNETS.DEPTH", "18",
                                                              "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]))
    KDCheckpointer(other).load(str(tmp_path / "combined.pth"))
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in other.teacher.state_dict().items())
    assert other.missing_teacher_keys() == []


def test_fast_roi_align_scripts_like_detectron2():
    cfg = get_kd_cfg(os.path.join(DET, "COCO-Detection", "faster_rcnn_R_18_FPN_3x.yaml"), TINY_OPTS)
    model = build_kd_model(cfg).eval()
    pooler = model.roi_heads.box_pooler
    assert type(pooler.level_poolers[0]).__name__ == "FastROIAlign"
    scripted = torch.jit.script(pooler)
    from detectron2.structures import Boxes

    feats = [torch.randn(1, 256, 16 // 2 ** i, 24 // 2 ** i) for i in range(4)]
    boxes = [Boxes(torch.tensor([[2.0, 3.0, 40.0, 30.0], [10.0, 10.0, 60.0, 50.0]]))]
    torch.testing.assert_close(scripted(feats, boxes), pooler(feats, boxes))


@pytest.mark.skipif(not using_placeholder_ops(), reason="detectron2 has its compiled ops here")
def test_missing_torch_ops_raise_the_placeholder_error():
    from detectron2.layers import nms_rotated

    with pytest.raises(MissingCompiledOpError, match="torch.ops.detectron2.nms_rotated"):
        nms_rotated(torch.zeros(2, 5), torch.zeros(2), 0.5)


def test_recorder_keeps_nothing_in_evaluation(tmp_path):
    retina = os.path.join(DET, "COCO-Detection", "retinanet_R_18_FPN_3x.yaml")
    path = tmp_path / "crosskd.yaml"
    path.write_text(f'_BASE_: "{retina}"\nTEACHER:\n  CONFIG_FILE: "{retina}"\nKD:\n  METHODS: ["CrossKD"]\n')
    model = build_kd_model(get_kd_cfg(str(path), TINY_OPTS)).train()
    with EventStorage():
        model(synthetic_batch())  # attaches the hooks; CrossKD taps the student's head
    assert model.kd_crosskd.student_taps()
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(synthetic_batch(1))
    assert not model._recorder.lists and not model._recorder.values
