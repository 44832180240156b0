"""tools/demo_det.py in a tiny setting: results.json schema, the PNG, the table, the cached teacher."""
import json
import math
import os

import pytest
import torch
from kd_cls.testing import load_script

pytest.importorskip("detectron2")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--teacher-iters", "2", "--student-iters", "1", "--num-train", "4", "--num-val", "2", "--image-size", "64"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo():
    return load_script(os.path.join(REPO, "tools", "demo_det.py"), "demo_det")


def _run(demo, argv):
    threads = torch.get_num_threads()
    try:
        return demo.main(argv)
    finally:
        torch.set_num_threads(threads)  # the demo sets its own count


def _check_schema(rows, methods, seeds):
    for r in rows:
        assert set(r) == {"role", "model", "method", "seed", "metric", "value"}, r
        assert r["metric"] == "box_AP" and isinstance(r["model"], str) and isinstance(r["seed"], int)
        assert isinstance(r["value"], float) and math.isfinite(r["value"]), r
    teachers = [r for r in rows if r["role"] == "teacher"]
    assert len(teachers) == 1 and teachers[0]["method"] == "vanilla"
    students = [r for r in rows if r["role"] == "student"]
    assert {r["method"] for r in students} == set(methods)
    for m in methods:
        assert sorted(r["seed"] for r in students if r["method"] == m) == seeds, m


@pytest.mark.slow
def test_demo_tiny_then_cached_teacher(demo, tmp_path, capsys):
    out = tmp_path / "demo"
    rows = _run(demo, TINY + ["--out", str(out), "--seeds", "2", "--first-seed", "5", "--methods", "FGD", "PKD"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())["rows"]
    assert saved == rows
    _check_schema(saved, ["vanilla", "FGD", "PKD"], [5, 6])
    assert (out / "demo_det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "demo_det.png").stat().st_size > 5000
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[3].strip() == "method" and "gain ± SE" in table[0]
    assert [line.split("|")[3].strip() for line in table[1:]] == ["vanilla", "vanilla", "FGD", "PKD"]
    assert all(line.split("|")[-2].strip() == "2" for line in table[2:])  # the seeds column
    assert "training the teacher" in printed
    runs = out / "det" / "runs" / "rcnn"
    assert (runs / "FGD-seed6" / "model_student.pth").is_file()  # the distilled student alone, for its detector
    assert (runs / "vanilla-seed5" / "model_final.pth").is_file()
    (teacher_dir,) = (out / "det" / "teachers").iterdir()
    weights = teacher_dir / "model_final.pth"
    info = json.loads((teacher_dir / "teacher.json").read_text())
    assert len(info["config_hash"]) == 64 and weights.is_file()
    mtime = weights.stat().st_mtime_ns

    # Same teacher config, other seeds: the teacher is reused, untouched; the rows are the new run's.
    rows2 = _run(demo, TINY + ["--out", str(out), "--seeds", "2", "--first-seed", "5", "--methods", "FGD"])
    printed = capsys.readouterr().out
    assert "training the teacher" not in printed and "cached in" in printed
    assert weights.stat().st_mtime_ns == mtime
    _check_schema(rows2, ["vanilla", "FGD"], [5, 6])
    assert rows2[0]["value"] == rows[0]["value"]
    assert [p.name for p in (out / "det" / "teachers").iterdir()] == [teacher_dir.name]


def test_rows_of_the_classification_demo_are_kept(demo, tmp_path):
    cls_row = {"role": "student", "model": "resnet8", "method": "KD", "seed": 0, "metric": "top1", "value": 90.0}
    (tmp_path / "results.json").write_text(json.dumps({"rows": [cls_row]}))
    det_row = {"role": "student", "model": "m", "method": "FGD", "seed": 0, "metric": "box_AP", "value": 1.0}
    demo.write_rows(str(tmp_path), [det_row])
    demo.write_rows(str(tmp_path), [dict(det_row, value=2.0)])
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == [cls_row, dict(det_row, value=2.0)]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "error: --seeds 0 is too small; give 1 or more"),
    (["--methods", "FGDD"], "error: unknown method 'FGDD'. Valid choices: "),
    (["--methods", "CrossKD"], "error: method CrossKD does not serve a Faster R-CNN student"),
    (["--methods", "FGD", "FGD"], "error: --methods FGD FGD: give each method once"),
    (["--image-size", "abc"], "error: argument --image-size: invalid int value: 'abc'"),
])
def test_bad_input_is_one_line_before_anything_is_written(demo, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        demo.main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_out_under_a_file_is_refused(demo, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "afile" / "out")])
    assert "is a file, not a folder" in capsys.readouterr().err
