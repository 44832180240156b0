"""tools/train.py and tools/eval.py: the digits round trip, the seed README commands on a bare
machine, and one-line errors for bad input (no run directory is created)."""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from kd_cls.checkpoint_io import atomic_save as save_checkpoint
from kd_cls.engine.cli import eval_main, train_main
from kd_cls.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VANILLA = os.path.join(REPO, "configs", "cifar100", "vanilla.yaml")
DKD = os.path.join(REPO, "configs", "cifar100", "dkd", "res32x4_res8x4.yaml")
FAST = ["DATASET.SUBSET", "48", "SOLVER.BATCH_SIZE", "16", "DATASET.TEST.BATCH_SIZE", "48"]
RESULT = re.compile(r"^top-1 \d+\.\d\d top-5 \d+\.\d\d loss \d+\.\d{4}$")


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    lines = [l for l in err if l.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_digits_round_trip(in_tmp_cwd, capsys):
    # 1. vanilla teacher on digits
    assert train_main(["--cfg", VANILLA, "DATASET.TYPE", "digits", "SOLVER.EPOCHS", "1",
                       "DISTILLER.STUDENT", "resnet20", *FAST]) == 0
    best = glob.glob("output/cifar100_baselines/vanilla,res32x4,res8x4+*/student_best")
    assert len(best) == 1 and set(torch.load(best[0], weights_only=True)) == {"model"}
    # 2. DKD with that teacher
    assert train_main(["--cfg", DKD, "DATASET.TYPE", "digits", "SOLVER.EPOCHS", "1", "DISTILLER.TEACHER", "resnet20",
                       "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS", best[0], *FAST]) == 0
    out = capsys.readouterr().out
    assert "teacher top-1" in out  # the teacher's own accuracy is logged at start
    student = glob.glob("output/cifar100_baselines/dkd,res32x4,res8x4+*/student_best")
    assert len(student) == 1
    # 3. evaluate the student
    assert eval_main(["-m", "resnet8", "-c", student[0], "-d", "digits"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert RESULT.match(lines[-1]), lines[-1]


@pytest.mark.slow
def test_seed_readme_commands_stop_clearly_without_data(in_tmp_cwd):
    cmds = [
        [os.path.join(REPO, "tools", "train.py"), "--cfg", DKD, "SOLVER.BATCH_SIZE", "128", "SOLVER.LR", "0.1"],
        [os.path.join(REPO, "tools", "eval.py"), "-m", "resnet32x4"],
        [os.path.join(REPO, "tools", "eval.py"), "-m", "resnet8x4", "-c", "download_ckpts/dkd_resnet8x4"],
    ]
    procs = [subprocess.Popen([sys.executable, *c], cwd=in_tmp_cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    try:
        results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    expect = [
        ("./data/cifar-100-python", "cifar-100-python.tar.gz"),
        ("download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth", "cifar_teachers.tar"),
        ("download_ckpts/dkd_resnet8x4", "releases"),
    ]
    for (out, err, rc), words in zip(results, expect):
        assert rc == 2, err[-2000:]
        lines = [l for l in err.splitlines() if l.startswith("error: ")]
        assert len(lines) == 1 and all(w in lines[0] for w in words), err[-2000:]
    assert not os.path.exists(in_tmp_cwd / "output")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["DISTILLER.STUDENT", "resnet9"], ["'resnet9'", "DISTILLER.STUDENT", "resnet8,"]),
        (["DISTILLER.TYPE", "FOO"], ["distiller 'FOO'", "DKD"]),
        (["DATASET.TYPE", "foo"], ["dataset 'foo'", "cifar100", "digits"]),
        (["SOLVER.LRR", "0.1"], ["SOLVER.LRR", "SOLVER.LR"]),
        (["SOLVER.TRAINER", "bse"], ["trainer 'bse'", "base"]),
        (["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet32x4"],
         ["download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth", "DISTILLER.TEACHER_WEIGHTS"]),
    ],
)
def test_train_errors_are_one_line(in_tmp_cwd, capsys, argv, words):
    assert train_main(["--cfg", VANILLA, "DATASET.TYPE", "digits", *FAST, *argv]) == 2
    line = _one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not os.path.exists(in_tmp_cwd / "output")


def test_teacher_dataset_class_mismatch(in_tmp_cwd, capsys):
    save_checkpoint({"model": build_model("resnet8", num_classes=100).state_dict()}, "t100.pth")
    assert train_main(["--cfg", DKD, "DATASET.TYPE", "digits", "DISTILLER.TEACHER", "resnet8",
                       "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS", "t100.pth", *FAST]) == 2
    line = _one_error_line(capsys)
    assert "t100.pth has 100 classes but the teacher resnet8 needs 10" in line
    assert not os.path.exists(in_tmp_cwd / "output")


def test_eval_errors_are_one_line(in_tmp_cwd, capsys):
    assert eval_main(["-m", "resnet9", "-d", "digits"]) == 2
    assert "'resnet9'" in _one_error_line(capsys)
    state = build_model("resnet8", num_classes=10, dataset="digits").state_dict()
    state.pop("fc.weight")
    state["head.weight"] = torch.zeros(2)
    save_checkpoint({"model": state}, "bad.pth")
    assert eval_main(["-m", "resnet8", "-c", "bad.pth", "-d", "digits"]) == 2
    line = _one_error_line(capsys)
    assert "missing keys: fc.weight" in line and "unexpected keys: head.weight" in line
    with pytest.raises(SystemExit):
        eval_main(["-m", "resnet8", "-d", "mnist"])
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_seed_commands_run_with_cifar_files_in_place(in_tmp_cwd, capsys):
    from test_data import _write_fake_cifar

    _write_fake_cifar("data", n_train=8, n_test=4)
    teacher = "download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth"
    save_checkpoint({"model": build_model("resnet32x4", num_classes=100).state_dict()}, teacher)
    save_checkpoint({"model": build_model("resnet8x4", num_classes=100).state_dict()}, "download_ckpts/dkd_resnet8x4")
    assert train_main(["--cfg", DKD, "SOLVER.BATCH_SIZE", "128", "SOLVER.LR", "0.1", "SOLVER.EPOCHS", "1"]) == 0
    # SOLVER.EPOCHS is not part of the run's name (a finished run is extended with --resume SOLVER.EPOCHS N).
    run = "output/cifar100_baselines/dkd,res32x4,res8x4+SOLVER.BATCH_SIZE:128,SOLVER.LR:0.1"
    assert os.path.isfile(os.path.join(run, "student_best"))
    capsys.readouterr()
    for argv in (["-m", "resnet32x4"], ["-m", "resnet8x4", "-c", "download_ckpts/dkd_resnet8x4"]):
        assert eval_main(argv) == 0
        assert RESULT.match(capsys.readouterr().out.strip().splitlines()[-1])
