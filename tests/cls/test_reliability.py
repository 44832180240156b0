"""Bad input is one line and exit 2 with nothing written; kills and Ctrl-C lose or double no epoch.

Each test here reproduces a defect of an earlier version (a traceback, a doubled
epoch in the worklog, a stale best checkpoint, a silently reused run directory).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kd_cls.checkpoint_io import atomic_save, load_checkpoint
from kd_cls.engine.cli import eval_main, train_main
from kd_cls.models import build_model
from kd_cls.testing import default_sigint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VANILLA = os.path.join(REPO, "configs", "cifar100", "vanilla.yaml")
DKD = os.path.join(REPO, "configs", "cifar100", "dkd", "res32x4_res8x4.yaml")
TINY = ["DATASET.TYPE", "digits", "DATASET.SUBSET", "48", "SOLVER.BATCH_SIZE", "16", "DATASET.TEST.BATCH_SIZE", "48",
        "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER", "resnet8", "LOG.EVAL_TEACHER", "False",
        "DATASET.NUM_WORKERS", "0"]


def _one_error(capsys, code, expected):
    assert code == expected
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    errors = [l for l in err if l.startswith("error: ")]
    assert len(errors) == 1, err
    assert not any("Traceback" in l for l in err), err
    return errors[0]


def _nothing_written(root):
    return not os.path.exists(os.path.join(root, "output"))


@pytest.mark.parametrize("text, match", [("", "is empty"), ("SOLVER:\n  LR: [0.1\n", "not valid YAML at line 3"),
                                         ("- a\n- b\n", "not a config")])
def test_bad_config_file_is_one_line(in_tmp_cwd, capsys, text, match):
    (in_tmp_cwd / "bad.yaml").write_text(text)
    line = _one_error(capsys, train_main(["--cfg", "bad.yaml"]), 2)
    assert match in line and "bad.yaml" in line
    assert _nothing_written(in_tmp_cwd)


def _bad_checkpoints(root):
    (root / "text.pth").write_text("not a checkpoint\n")
    atomic_save({"model": build_model("resnet8", num_classes=10, dataset="digits").state_dict()}, str(root / "ok.pth"))
    (root / "cut.pth").write_bytes((root / "ok.pth").read_bytes()[:20000])
    return ["text.pth", "cut.pth"]


def test_unreadable_checkpoints_are_one_line(in_tmp_cwd, capsys):
    for name in _bad_checkpoints(in_tmp_cwd):
        code = train_main(["--cfg", DKD, *TINY, "DISTILLER.TEACHER_WEIGHTS", name, "SOLVER.EPOCHS", "1"])
        line = _one_error(capsys, code, 2)
        assert name in line and "not a readable torch checkpoint" in line
        line = _one_error(capsys, eval_main(["-m", "resnet8", "-c", name, "-d", "digits"]), 2)
        assert name in line and "not a readable torch checkpoint" in line
    assert _nothing_written(in_tmp_cwd)


def test_unusable_output_folder_is_one_line(in_tmp_cwd, capsys):
    (in_tmp_cwd / "afile").write_text("x")
    for prefix, match in (("afile/out", "is a file, not a folder"), ("/sys/kd-test/out", "is not writable")):
        line = _one_error(capsys, train_main(["--cfg", VANILLA, *TINY, "LOG.PREFIX", prefix]), 2)
        assert "LOG.PREFIX" in line and match in line
    assert not os.path.exists("/sys/kd-test")


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_no_epochs_is_refused(in_tmp_cwd, capsys, epochs):
    line = _one_error(capsys, train_main(["--cfg", VANILLA, *TINY, "SOLVER.EPOCHS", epochs]), 2)
    assert f"SOLVER.EPOCHS {epochs}" in line
    assert _nothing_written(in_tmp_cwd)


def test_dimension_mismatch_stops_before_the_run_directory(in_tmp_cwd, capsys):
    atomic_save({"model": build_model("resnet8", num_classes=10, dataset="digits").state_dict()}, "t.pth")
    crd = os.path.join(REPO, "configs", "cifar100", "crd.yaml")
    code = train_main(["--cfg", crd, *TINY, "DISTILLER.TEACHER_WEIGHTS", "t.pth", "CRD.FEAT.STUDENT_DIM", "256",
                       "LOG.EVAL_TEACHER", "True"])
    line = _one_error(capsys, code, 2)
    assert "CRD.FEAT.STUDENT_DIM" in line and "64" in line
    assert _nothing_written(in_tmp_cwd)


def _worklog_epochs(run):
    with open(os.path.join(run, "worklog.txt")) as f:
        return [int(l.split()[1]) for l in f if l.startswith("epoch: ")]


def _run_dir(root):
    """The one run directory under ``output/distill`` (its name carries the command line's overrides)."""
    import glob

    runs = glob.glob(os.path.join(str(root), "output", "distill", "run*"))
    assert len(runs) <= 1, runs
    return runs[0] if runs else os.path.join(str(root), "output", "distill", "run+none-yet")


def test_resume_extends_a_finished_run_and_may_come_last(in_tmp_cwd, capsys):
    base = ["--cfg", VANILLA, *TINY, "EXPERIMENT.PROJECT", "distill", "EXPERIMENT.NAME", "run"]
    assert train_main(base + ["SOLVER.EPOCHS", "1"]) == 0
    run = _run_dir(in_tmp_cwd)
    # --resume after the overrides, with more epochs: the same run directory continues.
    assert train_main(base + ["SOLVER.EPOCHS", "2", "--resume"]) == 0
    assert _worklog_epochs(run) == [1, 2]
    assert load_checkpoint(os.path.join(run, "latest"))["epoch"] == 2
    assert len(os.listdir(os.path.join(in_tmp_cwd, "output", "distill"))) == 1


def test_rerun_without_resume_is_refused(in_tmp_cwd, capsys):
    base = ["--cfg", VANILLA, *TINY, "EXPERIMENT.PROJECT", "distill", "EXPERIMENT.NAME", "run", "SOLVER.EPOCHS", "1"]
    assert train_main(base) == 0
    run = _run_dir(in_tmp_cwd)
    before = {f: os.path.getmtime(os.path.join(run, f)) for f in os.listdir(run)}
    capsys.readouterr()
    line = _one_error(capsys, train_main(base), 2)
    assert "--resume" in line and "EXPERIMENT.NAME" in line and "LOG.PREFIX" in line
    assert {f: os.path.getmtime(os.path.join(run, f)) for f in os.listdir(run)} == before


def test_resume_without_a_checkpoint_starts_at_epoch_one(in_tmp_cwd, capsys):
    base = ["--cfg", VANILLA, *TINY, "EXPERIMENT.PROJECT", "distill", "EXPERIMENT.NAME", "run", "SOLVER.EPOCHS", "1"]
    assert train_main(base + ["--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert _worklog_epochs(_run_dir(in_tmp_cwd)) == [1]


def test_stale_temporary_files_are_removed(in_tmp_cwd):
    base = ["--cfg", VANILLA, *TINY, "EXPERIMENT.PROJECT", "distill", "EXPERIMENT.NAME", "run", "SOLVER.EPOCHS", "1"]
    assert train_main(base) == 0
    run = _run_dir(in_tmp_cwd)
    for stale in (".latest.tmp4242", ".student_best.tmp77"):
        with open(os.path.join(run, stale), "wb") as f:
            f.write(b"partial")
    assert train_main(base[:-2] + ["SOLVER.EPOCHS", "2", "--resume"]) == 0
    assert not [f for f in os.listdir(run) if ".tmp" in f]


# --------------------------------------------------------------------------------------- kills
KILLER = textwrap.dedent("""
    # Runs tools/train.py's main, SIGKILLing itself at the k-th call of one operation:
    # replace = the rename that ends every atomic checkpoint/config/log write; write = half-way
    # through appending to the worklog.
    import os, signal, sys
    what, k = sys.argv[1], int(sys.argv[2])
    calls = [0]

    def hit():
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    if what == "replace":
        real_replace = os.replace
        def replace(a, b):
            hit()
            return real_replace(a, b)
        os.replace = replace
    else:
        from kd_cls.engine import logger
        real_write = logger.RunLogger.write
        def write(self, text):
            calls[0] += 1
            if calls[0] == k:
                real_write(self, text[: len(text) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(self, text)
        logger.RunLogger.write = write
    from kd_cls.engine.cli import train_main
    sys.exit(train_main(sys.argv[3:]))
""")


def _check_run_state(run, epochs_done):
    latest = load_checkpoint(os.path.join(run, "latest"))
    best = load_checkpoint(os.path.join(run, "best"))
    assert latest["epoch"] <= epochs_done
    assert best["best_acc"] >= latest["best_acc"]  # best is never older than latest's best_acc
    load_checkpoint(os.path.join(run, "student_latest"))


@pytest.mark.slow
def test_kills_at_many_points_lose_or_double_no_epoch(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    n_epochs = 4
    args = ["--cfg", VANILLA, *TINY, "EXPERIMENT.PROJECT", "distill", "EXPERIMENT.NAME", "run",
            "SOLVER.EPOCHS", str(n_epochs), "DATASET.SUBSET", "32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    # Each entry kills one attempt at the k-th call (a rename ending an atomic write, or half-way through a
    # worklog block); every attempt after the first resumes. A run that ends before the k-th call exits 0.
    plan = [("replace", 2), ("write", 1), ("replace", 4), ("write", 2), (None, 0)]
    kills = 0
    for i, (what, k) in enumerate(plan):
        cmd = [sys.executable, str(script), what or "replace", str(k or 10 ** 6), *args] + (["--resume"] if i else [])
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode in (0, -signal.SIGKILL), (what, k, proc.returncode, proc.stderr[-2000:])
        kills += proc.returncode == -signal.SIGKILL
        run = _run_dir(tmp_path)
        if os.path.isfile(os.path.join(run, "latest")):
            _check_run_state(run, n_epochs)
    assert kills >= 3
    assert _worklog_epochs(run) == list(range(1, n_epochs + 1))
    assert load_checkpoint(os.path.join(run, "latest"))["epoch"] == n_epochs
    assert not [f for f in os.listdir(run) if ".tmp" in f]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(tmp_path):
    args = [sys.executable, os.path.join(REPO, "tools", "train.py"), "--cfg", VANILLA, *TINY,
            "EXPERIMENT.PROJECT", "distill", "EXPERIMENT.NAME", "run", "SOLVER.EPOCHS", "200"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 180
    while not os.path.isfile(os.path.join(_run_dir(tmp_path), "latest")) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.2)
    latest = os.path.join(_run_dir(tmp_path), "latest")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error: interrupted") and "--resume" in lines[-1]
    assert not any("Traceback" in l for l in lines)
    assert load_checkpoint(latest)["epoch"] >= 1
