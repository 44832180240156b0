"""tools/benchmark.py runs every case on the CPU with tiny settings and reports the promised fields."""
import json
import os

import pytest
from kd_cls.testing import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = ("case", "device", "images_per_s", "step_ms_mean", "step_ms_p90", "peak_mem_mb")


@pytest.fixture(scope="module")
def bench():
    return load_script(os.path.join(REPO, "tools", "benchmark.py"), "kd_benchmark")


@pytest.fixture
def keep_cuda_env(monkeypatch):
    # main() hides CUDA for --device cpu; restore the variable after the test.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))


def _check_common(r, case):
    for key in REQUIRED:
        assert key in r, key
    assert r["case"] == case and r["device"] == "cpu"
    assert r["images_per_s"] > 0 and r["step_ms_mean"] > 0
    assert r["step_ms_p90"] >= r["step_ms_mean"] * 0.999 or r["steps"] > 1
    assert r["peak_mem_mb"] >= 0
    # images/s and the mean step time describe the same steps
    assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["step_ms_mean"], rel=0.02)


def test_classification_cases_tiny(bench, tmp_path, keep_cuda_env, capsys):
    out = tmp_path / "bench"
    results = bench.main(["--device", "cpu", "--case", "a", "b", "--steps", "1", "--warmup", "0",
                          "--batch-size", "2", "--image-size", "64", "--workers", "0", "--no-plain", "--no-mem-probe",
                          "--out", str(out)])
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert [r["case"] for r in lines] == ["a", "b"]
    a, b = lines
    _check_common(a, "a")
    _check_common(b, "b")
    assert a["image_size"] == [32, 32] and b["image_size"] == [64, 64]
    assert (a["teacher"], a["student"], a["method"]) == ("resnet32x4", "resnet8x4", "DKD")
    assert (b["teacher"], b["student"], b["method"]) == ("ResNet34", "ResNet18", "KD")
    # The teacher ran through its BN-folded copy.
    assert a["fold_teacher_bn"] and a["folded_bns"] == 34  # every BN of resnet32x4 follows a conv
    assert a["loader_images_per_s"] > 0 and a["loader_pil_images_per_s"] > 0
    saved = json.loads((out / "benchmark_cpu.json").read_text())
    assert [r["case"] for r in saved["results"]] == ["a", "b"] and saved["command"].startswith("python")
    assert (out / "benchmark_cpu.png").stat().st_size > 1000
    assert results == lines


def test_case_a_with_a_warm_teacher_cache(bench, tmp_path, keep_cuda_env, capsys, monkeypatch):
    from kd_cls.nn.teacher import FrozenTeacher

    teacher_batches = []
    run = FrozenTeacher.run

    def counting(self, *inputs, **kw):
        teacher_batches.append(inputs[0].shape[0])
        return run(self, *inputs, **kw)

    monkeypatch.setattr(FrozenTeacher, "run", counting)
    bench.main(["--device", "cpu", "--case", "a", "--teacher-cache", "warm", "--steps", "2", "--warmup", "0",
                "--batch-size", "2", "--workers", "0", "--no-plain", "--no-mem-probe", "--no-plot",
                "--out", str(tmp_path)])
    (r,) = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    _check_common(r, "a")
    assert r["teacher_cache"] == "warm" and r["images_per_s"] > 0
    assert teacher_batches == [2]  # the untimed fill only: no timed step ran the teacher
    with pytest.raises(SystemExit):
        bench.parse_args(["--case", "b", "--teacher-cache", "warm"])
    assert "works with --case a only" in capsys.readouterr().err


def test_loader_only_mode(bench, tmp_path, keep_cuda_env, capsys):
    bench.main(["--device", "cpu", "--case", "a", "--loader-only", "--batch-size", "8", "--steps", "2",
                "--workers", "0", "--no-plot", "--out", str(tmp_path)])
    (r,) = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert r["images_per_s"] == r["loader_images_per_s"] > 0
    assert r["step_ms_mean"] is None


def test_detection_case_tiny(bench, tmp_path, keep_cuda_env, capsys):
    pytest.importorskip("detectron2")
    pytest.importorskip("kd_det")
    bench.main(["--device", "cpu", "--case", "c", "--steps", "1", "--warmup", "0", "--image-size", "64x96",
                "--no-plot", "--out", str(tmp_path), "--det-opts",
                "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16",
                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16"])
    (r,) = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    _check_common(r, "c")
    assert r["image_size"] == [64, 96] and r["batch_size"] == 2
    assert r["student_plain_step_ms"] > 0 and r["teacher_forward_ms"] > 0
    assert r["parts_sum_ms"] == pytest.approx(r["student_plain_step_ms"] + r["teacher_forward_ms"], abs=0.02)
    assert r["ratio_to_parts"] == pytest.approx(r["step_ms_mean"] / r["parts_sum_ms"], rel=0.01)
    assert r["fast_roi_align"] and r["student_fast_step_ms"] > 0
    assert r["kd_added_ms"] == pytest.approx(r["step_ms_mean"] - r["student_fast_step_ms"], abs=0.02)


def test_retinanet_case_tiny(bench, tmp_path, keep_cuda_env, capsys):
    pytest.importorskip("detectron2")
    pytest.importorskip("kd_det")
    bench.main(["--device", "cpu", "--case", "d", "--steps", "1", "--warmup", "0", "--image-size", "64x96",
                "--no-plot", "--out", str(tmp_path)])
    (r,) = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    _check_common(r, "d")
    assert r["teacher"] == "RetinaNet R-101-FPN" and r["student"] == "RetinaNet R-18-FPN"
    assert r["student_plain_step_ms"] > 0 and r["teacher_forward_ms"] > 0 and r["peak_mem_mb"] >= 0
    assert r["ratio_to_parts"] == pytest.approx(r["step_ms_mean"] / r["parts_sum_ms"], rel=0.01)
    assert not r["fast_roi_align"]  # RetinaNet has no RoIAlign


def test_bad_arguments_name_the_choices(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--case", "e"])
    assert "unknown case 'e'; valid: a, b, c, d, all" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--image-size", "big"])
    assert "expected N or HxW" in capsys.readouterr().err


def test_p90_and_throughput_summary(bench):
    # 10 steps of 10..100 ms: mean 55 ms, p90 the 9th value, 90 ms; 4 images per step.
    s = bench.summarize([i / 100 for i in range(1, 11)], batch=4)
    assert s["step_ms_mean"] == pytest.approx(55.0)
    assert s["step_ms_p90"] == pytest.approx(90.0)
    assert s["images_per_s"] == pytest.approx(40 / 0.55, rel=1e-3)
