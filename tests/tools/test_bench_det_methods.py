"""tools/bench_det_methods.py in a tiny setting: n/a cells, rows per family, the rerun that keeps them."""
import json
import math
import os

import pytest
import torch
from kd_cls.testing import load_script

pytest.importorskip("detectron2")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--teacher-iters", "1", "--student-iters", "1", "--num-train", "2", "--num-val", "1", "--image-size", "64",
        "--seeds", "1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_script(os.path.join(REPO, "tools", "bench_det_methods.py"), "bench_det_methods")


def test_serves(bench):
    from kd_det.methods import KD_METHODS

    b = bench
    assert not b.serves("DKD", "retinanet") and not b.serves("CrossKD", "rcnn")
    assert b.serves("DKD", "rcnn") and b.serves("CrossKD", "fcos")
    assert all(b.serves(m, f) for m in ("FGD", "MGD", "PKD", "CWD", "FitNet", "ReviewKD") for f in b.FAMILY_NAMES)
    assert set(KD_METHODS.names()) >= {"DKD", "CrossKD", "FGD"}


@pytest.mark.slow
def test_tiny_table_then_rerun_keeps_the_runs(bench, tmp_path, capsys):
    out, md = tmp_path / "b", tmp_path / "docs" / "t.md"
    argv = TINY + ["--families", "rcnn", "retinanet", "--methods", "DKD", "CrossKD", "FGD", "--out", str(out),
                   "--md", str(md)]
    threads = torch.get_num_threads()
    try:
        rows = bench.main(argv)
        capsys.readouterr()
        saved = json.loads((out / "results.json").read_text())
        assert saved["rows"] == rows and saved["settings"]["student_iters"] == 1
        runs = sorted((r["family"], r["role"], r["method"]) for r in rows)
        assert runs == [("rcnn", "student", "DKD"), ("rcnn", "student", "FGD"), ("rcnn", "student", "inherit only"),
                        ("rcnn", "student", "vanilla"), ("rcnn", "teacher", "vanilla"),
                        ("retinanet", "student", "CrossKD"), ("retinanet", "student", "FGD"),
                        ("retinanet", "student", "inherit only"), ("retinanet", "student", "vanilla"),
                        ("retinanet", "teacher", "vanilla")]
        assert all(math.isfinite(r["value"]) and r["metric"] == "box_AP" and r["seed"] == 0 for r in rows)
        text = md.read_text()
        assert "| method | Faster R-CNN | RetinaNet |" in text
        lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
        assert lines["DKD"].split("|")[3].strip() == "n/a" and lines["CrossKD"].split("|")[2].strip() == "n/a"
        assert "(" in lines["inherit only"] and "(" not in lines["vanilla"]  # a gain over vanilla, vanilla none
        assert "Command: `python tools/bench_det_methods.py --teacher-iters 1" in text and str(tmp_path) not in text
        assert "Machine: " in text
        assert (out / "bench_det_methods.png").stat().st_size > 5000

        # The same settings again: every run is kept, nothing trains.
        rows2 = bench.main(argv)
        printed = capsys.readouterr().out
        assert "10 runs kept" in printed and " seed 0 " not in printed
        assert rows2 == rows
    finally:
        torch.set_num_threads(threads)


def test_bad_family_is_one_line(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--families", "yolo", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument --families: invalid choice: 'yolo'")
    assert not (tmp_path / "x").exists()
