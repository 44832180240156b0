"""Teacher-logit cache: views, the file, equal training with a cold, warm or no cache, bad input, kills, DDP."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kd_cls.checkpoint_io import atomic_save
from kd_cls.data import get_dataset_info
from kd_cls.data.batch_aug import BatchAugment, DeviceLoader, ViewBatch
from kd_cls.distillers import build_distiller
from kd_cls.engine import get_cfg
from kd_cls.engine.checkpoint import config_differences
from kd_cls.engine.cli import cache_main, load_cfg, train_main
from kd_cls.engine.launch import build_run, experiment_name
from kd_cls.engine.teacher_cache import attach_teacher_cache, cache_key
from kd_cls.models import build_model
from kd_cls.models.pretrained import load_teacher
from kd_cls.nn.teacher import FrozenTeacher
from kd_cls.nn.teacher_cache import TeacherLogitCache, cache_bytes
from kd_cls.testing import make_imagenet_tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["DATASET.TYPE", "digits", "DATASET.SUBSET", "48", "SOLVER.BATCH_SIZE", "16", "DATASET.TEST.BATCH_SIZE", "48",
        "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER", "resnet8", "LOG.EVAL_TEACHER", "False",
        "DATASET.NUM_WORKERS", "0"]


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(1)
    path = str(tmp_path / "teacher.pth")
    atomic_save({"model": build_model("resnet8", num_classes=10, dataset="digits").state_dict()}, path)
    return path


def _cfg(tmp_path, teacher_file, *extra):
    cfg = get_cfg()
    cfg.merge_from_list(TINY + ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                                "LOG.PREFIX", str(tmp_path / "out"), *extra])
    return cfg


def _count_teacher_images(monkeypatch):
    seen = []
    original = FrozenTeacher.run

    def run(self, *inputs, **kw):
        seen.append(inputs[0].shape[0])
        return original(self, *inputs, **kw)

    monkeypatch.setattr(FrozenTeacher, "run", run)
    return seen


# ----------------------------------------------------------------------------- views
def test_view_ids_name_each_crop_and_flip_once_and_the_loader_reports_them():
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3)
    assert aug.num_views(32) == 162
    views = torch.arange(162)
    offsets, flips = aug.view_params(views, 32)
    assert offsets.min() == 0 and offsets.max() == 8 and flips.sum() == 81
    assert torch.equal(aug.view_ids(offsets, flips, 32), views)

    x = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    plain = DeviceLoader(x, y, 4, aug, aug, shuffle=True, with_index=True, seed=3)
    viewed = DeviceLoader(x, y, 4, aug, aug, shuffle=True, with_index=True, seed=3)
    viewed.with_view = True
    for loader in (plain, viewed):
        loader.set_epoch(2)
    for a, b in zip(plain, viewed):
        assert isinstance(b, ViewBatch) and len(a) == 3
        assert torch.equal(a[0], b.image) and torch.equal(a[2], b.index)  # the same draws, the same images
        # each image is the crop and flip its view id names
        o, f = aug.view_params(b.view, 32)
        assert torch.equal(aug(x[b.index], o, f), b.image)


# ----------------------------------------------------------------------------- the file
def test_store_lookup_commit_and_reopen(tmp_path):
    key = {"format": 1, "teacher": "t"}
    logs = []
    cache = TeacherLogitCache.open(str(tmp_path / "c"), key, 5, 162, 3, log=logs.append)
    assert len(logs) == 1 and "5 samples x 162 views" in logs[0]
    assert os.path.getsize(cache.path) == cache_bytes(5, 162, 3)
    index, view = torch.tensor([0, 4, 2]), torch.tensor([0, 161, 7])
    hits, out = cache.lookup(index, view)
    assert not hits.any() and not out.any()
    values = torch.randn(3, 3)
    cache.store(index[:2], view[:2], values[:2])
    other = TeacherLogitCache.open(str(tmp_path / "c"), key, 5, 162, 3, log=logs.append)
    # Written here, not yet committed: this process reads them, another one does not yet.
    assert cache.lookup(index, view)[0].tolist() == [True, True, False]
    assert not other.lookup(index, view)[0].any()
    cache.commit()
    hits, out = other.lookup(index, view)
    assert hits.tolist() == [True, True, False] and torch.equal(out[:2], values[:2])
    cache.close()
    other.close()
    again = TeacherLogitCache.open(str(tmp_path / "c"), key, 5, 162, 3, log=logs.append)
    assert again.filled().sum() == 2 and len(logs) == 1  # reopened, not remade
    with pytest.raises(ValueError, match="outside this cache"):
        again.lookup(torch.tensor([5]), torch.tensor([0]))


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("method", ["KD", "DKD"])
def test_cold_warm_and_no_cache_train_the_same_student(tmp_path, teacher_file, monkeypatch, method):
    seen = _count_teacher_images(monkeypatch)
    extra = ["DISTILLER.TYPE", method, "DKD.WARMUP", "2", "SOLVER.BATCH_SIZE", "8"]

    def twenty_steps(name, cache):
        run = build_run(_cfg(tmp_path, teacher_file, *extra, "EXPERIMENT.NAME", name,
                             "SOLVER.TEACHER_CACHE", cache))
        run.model.train()
        del seen[:]
        losses, epoch = [], 0
        while len(losses) < 20:
            epoch += 1
            run.train_loader.set_epoch(epoch)
            for batch in run.train_loader:
                losses.append(run.train_step(batch, epoch)["loss"].item())
                if len(losses) == 20:
                    break
        if run.distiller.teacher_cache is not None:
            run.distiller.teacher_cache.close()  # what the end of a run's process does
        return losses, run.distiller.student.state_dict(), sum(seen)

    folder = str(tmp_path / "cache")
    ref_losses, ref_state, ref_images = twenty_steps("none", "")
    cold_losses, cold_state, cold_images = twenty_steps("cold", folder)
    warm_losses, warm_state, warm_images = twenty_steps("warm", folder)
    assert ref_images == 20 * 8 and warm_images == 0  # warm: the teacher never ran
    assert 0 < cold_images <= ref_images  # cold: only the misses
    for losses in (cold_losses, warm_losses):
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for state in (cold_state, warm_state):
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_half_filled_batch_runs_the_teacher_on_its_misses_only(tmp_path, monkeypatch):

    seen = _count_teacher_images(monkeypatch)
    cfg = get_cfg()
    cfg.merge_from_list(["DISTILLER.TYPE", "DKD", "DATASET.TYPE", "digits"])
    torch.manual_seed(0)
    distiller = build_distiller(cfg, *[build_model("resnet8", num_classes=10, dataset="digits") for _ in range(2)])
    distiller.teacher_cache = TeacherLogitCache.open(str(tmp_path), {"k": 1}, 6, 162, 10, log=lambda m: None)
    image, index, view = torch.randn(6, 3, 32, 32), torch.arange(6), torch.tensor([0, 5, 9, 161, 80, 3])
    expected = distiller.frozen_teacher.run(image)[0]
    distiller.teacher_cache.store(index[::2], view[::2], expected[::2])
    del seen[:]
    logits, feats = distiller.run_teacher(image, index=index, view=view)
    assert seen == [3] and feats == []  # one teacher batch: the three misses
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # all hits: the dtype the teacher gives under autocast
        assert distiller.run_teacher(image, index=index, view=view)[0].dtype == torch.bfloat16
    assert seen == [3]


def test_the_cache_setting_is_not_part_of_a_run():

    # The cache gives the teacher's own logits: a run may turn it on or off and still --resume.
    cfg = get_cfg()
    assert experiment_name(cfg, ["SOLVER.TEACHER_CACHE", "c", "SOLVER.LR", "0.1"]) == experiment_name(
        cfg, ["SOLVER.LR", "0.1"])
    assert config_differences({"SOLVER": {"TEACHER_CACHE": ""}}, {"SOLVER": {"TEACHER_CACHE": "c"}}) == []


# ----------------------------------------------------------------------------- other runs
def test_feature_method_and_continuous_augmentation_log_one_line_and_run(tmp_path, teacher_file, capsys):
    run = build_run(_cfg(tmp_path, teacher_file, "DISTILLER.TYPE", "FITNET", "SOLVER.TEACHER_CACHE",
                         str(tmp_path / "cache")))
    lines = [l for l in capsys.readouterr().out.splitlines() if "TEACHER_CACHE" in l]
    assert len(lines) == 1 and "FITNET reads the teacher's features" in lines[0] and "goes on" in lines[0]
    assert run.distiller.teacher_cache is None and not os.path.exists(tmp_path / "cache")
    run.model.train()
    assert torch.isfinite(run.train_step(next(iter(run.train_loader)), 1)["loss"])


    make_imagenet_tree(str(tmp_path / "data"))
    cfg = get_cfg()
    cfg.merge_from_list(["DATASET.TYPE", "imagenet", "DATASET.ROOT", str(tmp_path / "data"), "DISTILLER.TYPE", "KD",
                         "DATASET.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "2", "SOLVER.TEACHER_CACHE",
                         str(tmp_path / "cache")])
    loader = get_dataset_info("imagenet").build(cfg, False)[0]
    models = [build_model("resnet8", num_classes=10, dataset="digits") for _ in range(2)]
    distiller = build_distiller(cfg, *models, num_data=4)
    assert attach_teacher_cache(cfg, distiller, loader) is None
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "not used" in line and "imagenet is continuous" in line
    assert distiller.teacher_cache is None and not os.path.exists(tmp_path / "cache")


def test_key_mismatch_makes_a_new_file_and_says_why(tmp_path, teacher_file, capsys):
    folder = tmp_path / "cache"
    build_run(_cfg(tmp_path, teacher_file, "EXPERIMENT.NAME", "a", "SOLVER.TEACHER_CACHE", str(folder)))
    (first,) = os.listdir(folder)
    before = (folder / first).read_bytes()
    capsys.readouterr()
    torch.manual_seed(2)  # other teacher weights
    other = str(tmp_path / "other.pth")
    atomic_save({"model": build_model("resnet8", num_classes=10, dataset="digits").state_dict()}, other)
    run = build_run(_cfg(tmp_path, other, "EXPERIMENT.NAME", "b", "SOLVER.TEACHER_CACHE", str(folder)))
    out = capsys.readouterr().out
    (making,) = [l for l in out.splitlines() if "making" in l]
    assert f"{first} is of another key (differs in teacher.sha256)" in making
    assert len(os.listdir(folder)) == 2 and (folder / first).read_bytes() == before
    assert os.path.basename(run.distiller.teacher_cache.path) != first


def _one_error(capsys, code):
    assert code == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_cache_input_is_one_line_before_any_write(in_tmp_cwd, teacher_file, capsys, monkeypatch):
    base = ["--cfg", os.path.join(REPO, "configs", "cifar100", "kd.yaml"), *TINY,
            "DISTILLER.TEACHER_WEIGHTS", teacher_file, "SOLVER.EPOCHS", "1"]
    (in_tmp_cwd / "afile").write_text("x")
    for where, match in (("/sys/kd-cache", "cannot write in /sys"), ("afile", "afile is a file, not a folder")):
        line = _one_error(capsys, train_main(base + ["SOLVER.TEACHER_CACHE", where]))
        assert "SOLVER.TEACHER_CACHE" in line and match in line
    # A cache file named outright must hold this run's key.
    named = str(in_tmp_cwd / "mine.kdcache")
    TeacherLogitCache.open(named, {"teacher": "another"}, 48, 162, 10, log=lambda m: None).close()
    line = _one_error(capsys, train_main(base + ["SOLVER.TEACHER_CACHE", named]))
    assert "holds the cache of another key (differs in dataset, format, precision, teacher" in line
    # Too little disk: the estimate, and nothing written.
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    line = _one_error(capsys, train_main(base + ["SOLVER.TEACHER_CACHE", "big"]))
    need = cache_bytes(48, 162, 10)
    assert f"needs {need / 1e6:.2f} MB (48 samples x 162 views x 10 classes x 4 B, plus flags)" in line
    assert "0.00 MB free" in line
    assert sorted(os.listdir(in_tmp_cwd)) == ["afile", "mine.kdcache", "teacher.pth"]


def test_fill_tool_help_and_bad_input(in_tmp_cwd, capsys):

    with pytest.raises(SystemExit):
        cache_main(["--help"])
    out = capsys.readouterr().out
    assert "tools/cache_teacher.py --cfg" in out and "--batch-size" in out and "resumes" in out
    kd = ["--cfg", os.path.join(REPO, "configs", "cifar100", "kd.yaml"), *TINY]
    for argv, match in ((["--batch-size", "0", *kd, "SOLVER.TEACHER_CACHE", "c"], "--batch-size 0 is not a batch size"),
                        (kd, "SOLVER.TEACHER_CACHE is empty"),
                        (kd + ["DISTILLER.TYPE", "FITNET", "SOLVER.TEACHER_CACHE", "c"],
                         "nothing to cache for this config: FITNET reads the teacher's features")):
        assert match in _one_error(capsys, cache_main(argv))
    assert os.listdir(in_tmp_cwd) == []


# ----------------------------------------------------------------------------- kills
KILLER = textwrap.dedent("""
    # tools/cache_teacher.py's main, SIGKILLed at the k-th commit (rows written and synced, flags not yet
    # set) or half-way through writing the k-th group of rows; every group is committed at once.
    import os, signal, sys
    from kd_cls.nn import teacher_cache as tc
    what, k = sys.argv[1], int(sys.argv[2])
    calls = [0]
    init = tc.TeacherLogitCache.__init__
    def eager(self, *a, **kw):
        init(self, *a, **kw)
        self.sync_every = 0.0
    tc.TeacherLogitCache.__init__ = eager
    if what == "commit":
        real = tc.os.fdatasync
        def fdatasync(fd):
            calls[0] += 1
            real(fd)
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
        tc.os.fdatasync = fdatasync
    else:
        store = tc.TeacherLogitCache.store_rows
        def half(self, rows, logits):
            calls[0] += 1
            if calls[0] == k:
                self._logits[rows[: len(rows) // 2]] = logits[: len(rows) // 2].float().numpy()
                os.kill(os.getpid(), signal.SIGKILL)
            return store(self, rows, logits)
        tc.TeacherLogitCache.store_rows = half
    from kd_cls.engine.cli import cache_main
    sys.exit(cache_main(sys.argv[3:]))
""")


@pytest.mark.slow
def test_a_killed_fill_restarts_and_loses_or_corrupts_nothing(tmp_path, teacher_file, capsys):

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    overrides = [*TINY, "DATASET.SUBSET", "8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                 "SOLVER.TEACHER_CACHE", str(tmp_path / "cache")]
    args = ["--cfg", os.path.join(REPO, "configs", "cifar100", "kd.yaml"), "--batch-size", "128", "--no-progress",
            *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for what, k in (("commit", 3), ("half", 2)):
        proc = subprocess.run([sys.executable, str(script), what, str(k), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        if what == "commit":  # 2 groups were flagged; the 3rd was written and synced, not flagged
            (path,) = [str(p) for p in (tmp_path / "cache").iterdir()]
            assert np.fromfile(path, np.uint8, 8 * 162, offset=4096).sum() == 2 * 128
    capsys.readouterr()
    assert cache_main(args) == 0
    assert "1296 of 1296 entries are filled" in capsys.readouterr().out
    # Every entry equals a fresh computation of its view.
    cfg = load_cfg(args[1], overrides)
    loader = get_dataset_info("digits").build(cfg, False)[0]
    teacher = load_teacher(cfg, 10).eval()
    cache = TeacherLogitCache.open(str(tmp_path / "cache"), cache_key(cfg, teacher, loader, 10), 8, 162, 10)
    index, view = torch.arange(8).repeat_interleave(162), torch.arange(162).repeat(8)
    offsets, flips = loader.augment.view_params(view, 32)
    with torch.no_grad():
        fresh = teacher(loader.augment(loader.images[index], offsets, flips))
    hits, cached = cache.lookup(index, view)
    assert hits.all()
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- DDP
DDP_WORKER = textwrap.dedent("""
    # Two runs under torchrun on one cache folder: a cold one fills it, a warm one reads it.
    import sys, torch
    from kd_cls.engine import get_cfg
    from kd_cls.engine.distributed import barrier, rank
    from kd_cls.engine.launch import build_run
    from kd_cls.nn.teacher import FrozenTeacher
    out, opts = sys.argv[1], sys.argv[2:]
    images = [0]
    run_teacher = FrozenTeacher.run
    def counting(self, *inputs, **kw):
        images[0] += inputs[0].shape[0]
        return run_teacher(self, *inputs, **kw)
    FrozenTeacher.run = counting
    result = {}
    for name in ("cold", "warm"):
        cfg = get_cfg()
        cfg.merge_from_list(opts + ["EXPERIMENT.NAME", name])
        trainer = build_run(cfg)
        cache = trainer.distiller.teacher_cache
        stored, seen = [], []
        store_rows = cache.store_rows
        cache.store_rows = lambda rows, logits: (stored.append(rows.copy()), store_rows(rows, logits))[1]
        images[0] = 0
        trainer.model.train()
        trainer.train_loader.set_epoch(1)
        for batch in trainer.train_loader:
            seen.append(cache.row_ids(batch.index, batch.view))
            trainer.train_step(batch, 1)
        cache.close()
        barrier()
        result[name] = {"stored": sorted(int(r) for s in stored for r in s),
                        "seen": sorted(int(r) for s in seen for r in s), "teacher_images": images[0],
                        "student": {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}}
    torch.save(result, f"{out}/rank{rank()}.pt")
""")


@pytest.mark.slow
def test_ddp_two_processes_fill_and_read_one_cache(tmp_path, teacher_file):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    opts = TINY + ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER_WEIGHTS", teacher_file, "LOG.PREFIX",
                   str(tmp_path / "out"), "SOLVER.TEACHER_CACHE", str(tmp_path / "cache")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        # Each process stored the rows of its own batches (every one a miss), and the warm run found them all.
        assert r["cold"]["stored"] == r["cold"]["seen"] and r["cold"]["teacher_images"] == 24
        assert r["warm"]["seen"] == r["cold"]["seen"] and r["warm"]["teacher_images"] == 0
        for k, v in r["cold"]["student"].items():
            torch.testing.assert_close(r["warm"]["student"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    seen = set(ranks[0]["cold"]["seen"]) | set(ranks[1]["cold"]["seen"])
    assert set(ranks[0]["cold"]["stored"]) | set(ranks[1]["cold"]["stored"]) == seen
    (path,) = (tmp_path / "cache").iterdir()
    flags = np.fromfile(str(path), np.uint8, 48 * 162, offset=4096)
    assert set(np.flatnonzero(flags).tolist()) == seen
