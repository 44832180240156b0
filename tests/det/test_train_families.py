"""tools/train_net.py end to end for RetinaNet and FCOS pairs (train, resume, evaluate, --eval-teacher),
and a two-process DDP run on the CPU (gloo, torchrun)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")

import kd_det  # noqa: E402,F401
from kd_det.data import register_shapes  # noqa: E402
from kd_det.data.shapes import make_shapes_dataset  # noqa: E402
from kd_det.engine import STUDENT_FILE  # noqa: E402
from kd_det.testing import TINY_OPTS  # noqa: E402
from kd_cls.testing import load_script  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET = os.path.join(REPO, "configs", "detection")
R18_TEACHER = ["TEACHER.MODEL.RESNETS.DEPTH", "18", "TEACHER.MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
FAMILIES = {
    "retinanet": ("ReviewKD/ReviewKD-RetinaNet-R18-R101.yaml", "MODEL.RETINANET.NUM_CLASSES"),
    "fcos": ("ReviewKD/ReviewKD-FCOS-R18-FasterRCNN-R50.yaml", "MODEL.FCOS.NUM_CLASSES"),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_shapes_dataset(root, num_train=6, num_val=3, image_size=64)
    register_shapes(root)
    yield root
    register_shapes()


def _train_net():
    return load_script(os.path.join(REPO, "tools", "train_net.py"), "train_net")


def _opts(family, out):
    return TINY_OPTS + R18_TEACHER + [
        FAMILIES[family][1], "3", "TEACHER.MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('shapes_train',)",
        "DATASETS.TEST", "('shapes_val',)", "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", out,
    ]


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_resume_evaluate(family, shapes_root, tmp_path):
    train_net = _train_net()
    out = str(tmp_path / "run")
    config = ["--config-file", os.path.join(DET, FAMILIES[family][0])]
    parse = train_net.build_parser().parse_args
    res = train_net.main(parse(config + ["--eval-teacher"] + _opts(family, out)))
    assert "AP" in res["bbox"]
    rows = [r for r in _metrics(out) if "loss_reviewkd" in r]
    assert rows and all(r["loss_reviewkd"] > 0 for r in rows)
    assert torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["iteration"] == 1
    # --resume continues from the last checkpoint, to the new MAX_ITER.
    train_net.main(parse(config + ["--resume"] + _opts(family, out) + ["SOLVER.MAX_ITER", "3"]))
    assert torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["iteration"] == 2
    # The student file evaluates as the plain detector of its family (--eval-only on the student config).
    student_cfg = FAMILIES[family][0]
    plain = ["--config-file", os.path.join(DET, "COCO-Detection", f"{family}_R_18_FPN_{'3x' if family == 'retinanet' else '1x'}.yaml"),
             "--eval-only"] + TINY_OPTS + [FAMILIES[family][1], "3", "DATASETS.TEST", "('shapes_val',)",
                                           "MODEL.WEIGHTS", os.path.join(out, STUDENT_FILE), "OUTPUT_DIR", out]
    assert student_cfg
    res = train_net.main(parse(plain))
    assert set(res["bbox"]) >= {"AP", "AP50"}


@pytest.mark.slow
def test_ddp_two_cpu_processes(shapes_root, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tools", "train_net.py"),
           "--config-file", os.path.join(DET, FAMILIES["retinanet"][0]),
           *_opts("retinanet", out), "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100",
           # 2 images per process: ReviewKD's BatchNorm needs more than one value on the 1x1 p7 of 64 px images
           "SOLVER.IMS_PER_BATCH", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS=shapes_root)
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    rows = _metrics(out)
    assert [r["iteration"] for r in rows if "loss_reviewkd" in r][-1] == 1  # written at the last iteration
    assert "World size: 2" in stdout + err
    assert os.path.isfile(os.path.join(out, STUDENT_FILE))
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
