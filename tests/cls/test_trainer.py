"""Trainer: schedule, metrics, checkpoints (layout, atomicity, prefixes), exact resume, NaN stop, DDP."""
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from kd_cls.engine import get_cfg
from kd_cls.checkpoint_io import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    model_state_from_checkpoint,
)
from kd_cls.checkpoint_io import atomic_save as save_checkpoint
from kd_cls.engine.checkpoint import ResumeError, config_differences
from kd_cls.engine.hooks import NonFiniteLossError
from kd_cls.engine.launch import build_run, experiment_name
from kd_cls.engine.metrics import accuracy, lr_at_epoch
from kd_cls.engine.trainers import TRAINERS, get_trainer
from kd_cls.models import build_model
from kd_cls.registry import UnknownNameError

TINY = ["DATASET.TYPE", "digits", "DATASET.SUBSET", 48, "SOLVER.BATCH_SIZE", 16, "DATASET.TEST.BATCH_SIZE", 48,
        "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER", "resnet8", "LOG.EVAL_TEACHER", False]


def tiny_cfg(prefix, *extra):
    cfg = get_cfg()
    cfg.merge_from_list(TINY + ["LOG.PREFIX", str(prefix), *extra])
    return cfg


def test_lr_schedule_is_mdistillers_step_decay():
    cfg = get_cfg()  # LR 0.05, stages 150/180/210, rate 0.1
    for epoch, lr in ((1, 0.05), (150, 0.05), (151, 0.005), (180, 0.005), (181, 5e-4), (211, 5e-5), (240, 5e-5)):
        assert lr_at_epoch(epoch, cfg) == pytest.approx(lr)


def test_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 1, 0, 2])
    top1, top2 = accuracy(logits, target, topk=(1, 2))
    assert top1.item() == pytest.approx(25.0) and top2.item() == pytest.approx(50.0)


def test_experiment_name_as_mdistiller_with_separator():
    cfg = get_cfg()
    cfg.merge_from_list(["EXPERIMENT.TAG", "dkd,res32x4,res8x4", "EXPERIMENT.PROJECT", "p"])
    assert experiment_name(cfg, []) == os.path.join("p", "dkd,res32x4,res8x4")
    opts = ["SOLVER.BATCH_SIZE", "128", "SOLVER.LR", "0.1", "LOG.WANDB", "True"]
    assert experiment_name(cfg, opts) == os.path.join("p", "dkd,res32x4,res8x4+SOLVER.BATCH_SIZE:128,SOLVER.LR:0.1")
    cfg.EXPERIMENT.NAME = "mine"
    assert experiment_name(cfg, ["DISTILLER.TEACHER_WEIGHTS", "a/b"]) == os.path.join("p", "mine+DISTILLER.TEACHER_WEIGHTS:a_b")


def test_trainer_registry():
    assert get_trainer("base") is TRAINERS.get("base") and issubclass(get_trainer("crd"), get_trainer("base"))
    with pytest.raises(UnknownNameError, match="Valid choices: .*base.*crd"):
        get_trainer("bse")


def test_config_differences_ignore_logging_and_epochs():
    a = {"SOLVER": {"LR": 0.05, "EPOCHS": 1}, "LOG": {"WANDB": False}}
    b = {"SOLVER": {"LR": 0.1, "EPOCHS": 2}, "LOG": {"WANDB": True}}
    assert config_differences(a, b) == [("SOLVER.LR", 0.05, 0.1)]


def test_checkpoint_atomic_layout_and_prefixes(tmp_path):
    model = build_model("resnet8", num_classes=10, dataset="digits")
    path = str(tmp_path / "student_best")
    save_checkpoint({"model": model.state_dict()}, path)
    assert os.listdir(tmp_path) == ["student_best"]  # no temporary file left behind
    # a DataParallel-style full state (mdistiller's 'latest') gives the student's weights
    full = {"module.student." + k: v for k, v in model.state_dict().items()}
    full.update({"module.teacher." + k: v for k, v in model.state_dict().items()})
    for state in (load_checkpoint(path), {"model": full, "epoch": 3}, {"model": {k[7:]: v for k, v in full.items()}}):
        fresh = build_model("resnet8", num_classes=10, dataset="digits")
        load_model_state(fresh, model_state_from_checkpoint(state), "ckpt")
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_checkpoint_errors_name_keys_and_classes():
    model = build_model("resnet8", num_classes=10, dataset="digits")
    state = dict(model.state_dict())
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, state, "some.pth")
    msg = str(e.value)
    assert "missing keys: fc.bias" in msg and "unexpected keys: extra.weight" in msg and "\n" not in msg
    other = build_model("resnet8", num_classes=100, dataset="cifar100").state_dict()
    with pytest.raises(CheckpointError, match="has 100 classes but the model needs 10"):
        load_model_state(model, other, "teacher.pth")


def test_train_step_overfits_a_batch(tmp_path):
    trainer = build_run(tiny_cfg(tmp_path, "SOLVER.LR", 0.05))
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    losses = [trainer.train_step(batch, epoch=1)["loss"].item() for _ in range(16)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_switch_sets_student_and_input_layout(tmp_path, channels_last):
    trainer = build_run(tiny_cfg(tmp_path, "SOLVER.CHANNELS_LAST", channels_last))
    conv_w = trainer.distiller.student.conv1.weight
    assert conv_w.is_contiguous(memory_format=torch.channels_last) is channels_last
    # An NHWC batch (what the CIFAR batch augmentation yields) gets the layout of the switch.
    nhwc = torch.randn(4, 8, 8, 3).permute(0, 3, 1, 2)
    image = trainer.unpack((nhwc, torch.zeros(4, dtype=torch.long)))[0]
    torch.testing.assert_close(image, nhwc)
    assert image.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert image.is_contiguous() is not channels_last


def _momentum(opt):
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]]


def test_kill_after_epoch_one_then_resume_is_exact(tmp_path, monkeypatch):
    teacher = build_model("resnet8", num_classes=10, dataset="digits")
    tw = str(tmp_path / "teacher.pth")
    save_checkpoint({"model": teacher.state_dict()}, tw)
    extra = ["DISTILLER.TYPE", "DKD", "DKD.WARMUP", 2, "DISTILLER.TEACHER_WEIGHTS", tw, "EXPERIMENT.NAME", "run",
             "SOLVER.EPOCHS", 2]

    # uninterrupted reference run
    ref = build_run(tiny_cfg(tmp_path / "ref", *extra))
    ref.train()

    # the same run, killed right after epoch 1 has been checkpointed
    from kd_cls.engine.trainers import BaseTrainer

    original = BaseTrainer.train_epoch

    def killed(self, epoch):
        out = original(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(BaseTrainer, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        build_run(tiny_cfg(tmp_path / "run", *extra)).train()
    monkeypatch.setattr(BaseTrainer, "train_epoch", original)
    run_dir = tmp_path / "run" / "distill" / "run"
    saved = load_checkpoint(str(run_dir / "latest"))
    assert saved["epoch"] == 1 and all(k.startswith("module.") for k in saved["model"])
    assert {"student_latest", "best", "student_best", "cfg.yaml", "worklog.txt"} <= set(os.listdir(run_dir))

    resumed = build_run(tiny_cfg(tmp_path / "run", *extra), resume=True)
    resumed.resume()
    assert resumed.start_epoch == 2
    saved_opt = torch.optim.SGD(resumed.distiller.get_learnable_parameters(), lr=0.1, momentum=0.9)
    saved_opt.load_state_dict(saved["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(_momentum(resumed.optimizer), _momentum(saved_opt)))
    resumed.start_epoch = 1  # train() resumes again by itself
    resumed.train(resume=True)
    final = load_checkpoint(str(run_dir / "latest"))
    assert final["epoch"] == 2
    for (k, a), b in zip(ref.distiller.student.state_dict().items(), resumed.distiller.student.state_dict().values()):
        assert torch.equal(a, b), k

    # a changed hyperparameter is refused, naming the key
    with pytest.raises(ResumeError, match="SOLVER.LR"):
        build_run(tiny_cfg(tmp_path / "run", *extra, "SOLVER.LR", 0.2), resume=True).train(resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from kd_cls.distillers.vanilla import Vanilla

    original = Vanilla.forward_train

    def poisoned(self, image, target, epoch=None, **kw):
        logits, losses = original(self, image, target, **kw)
        if epoch == 2:
            losses["loss_ce"] = losses["loss_ce"] * float("nan")
        return logits, losses

    monkeypatch.setattr(Vanilla, "forward_train", poisoned)
    trainer = build_run(tiny_cfg(tmp_path, "SOLVER.EPOCHS", 3, "EXPERIMENT.NAME", "nan"))
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    latest = os.path.join(trainer.log_path, "latest")
    assert "epoch 2" in str(e.value) and latest in str(e.value) and "nan" in str(e.value)
    assert load_checkpoint(latest)["epoch"] == 1


def test_wandb_failure_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    from kd_cls.engine.logger import RunLogger

    cfg = get_cfg()
    cfg.LOG.WANDB = True
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        logger = RunLogger(str(tmp_path), cfg, "x")
        logger.epoch(1, 0.1, {"test_acc": 1.0})
    assert any("W&B" in str(x.message) for x in w)
    assert "test_acc: 1.00" in (tmp_path / "worklog.txt").read_text()


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, repo_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(repo_root, "tools", "train.py"), *map(str, TINY), "SOLVER.EPOCHS", "1",
           "EXPERIMENT.NAME", "ddp", "LOG.PREFIX", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # A new session, so that a timeout can stop the workers along with the launcher.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    runs = list((tmp_path / "distill").glob("ddp+*"))
    assert len(runs) == 1
    run = runs[0]
    assert load_checkpoint(str(run / "latest"))["epoch"] == 1
    assert "test_acc" in (run / "worklog.txt").read_text()
