"""tools/demo.py in a tiny setting: results.json follows the schema, the PNG and the table are made, a second
run reuses the cached teacher, a changed teacher config retrains it, and bad input writes nothing."""
import json
import os

import pytest
from kd_cls.testing import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--teacher-epochs", "1", "--student-epochs", "1", "--seeds", "2", "--first-seed", "7",
        "--train-size", "20", "--teacher-train-size", "20"]
KEYS = {"role", "model", "method", "seed", "metric", "value"}


@pytest.fixture(scope="module")
def demo():
    return load_script(os.path.join(REPO, "tools", "demo.py"), "kd_demo_cls")


def _rows(out):
    with open(out / "results.json") as f:
        return json.load(f)["rows"]


def _check_results(rows, methods, seeds):
    assert all(set(r) == KEYS for r in rows), rows
    cls = [r for r in rows if r["metric"] == "top1"]
    teachers = [r for r in cls if r["role"] == "teacher"]
    assert len(teachers) == 1 and teachers[0]["method"] == "vanilla" and teachers[0]["model"] == "resnet20"
    students = [r for r in cls if r["role"] == "student"]
    assert sorted({r["method"] for r in students}) == sorted(methods)
    for m in methods:
        assert sorted(r["seed"] for r in students if r["method"] == m) == seeds
    assert all(isinstance(r["value"], float) and 0.0 <= r["value"] <= 100.0 for r in cls)
    assert {r["model"] for r in students} == {"resnet8"}


def test_demo_tiny_and_teacher_cache(demo, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    # The detection demo writes into the same results.json; its rows stay.
    det_row = {"role": "student", "model": "det", "method": "vanilla", "seed": 0, "metric": "box_AP", "value": 1.0}
    (out / "results.json").write_text(json.dumps({"rows": [det_row]}))

    assert demo.main(TINY + ["--out", str(out)]) == 0
    first = capsys.readouterr().out
    rows = _rows(out)
    _check_results(rows, ["vanilla", "KD", "DKD"], [7, 8])
    assert det_row in rows
    assert (out / "demo_cls.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| role" in first and "gain ± SE" in first and "| student | resnet8" in first
    assert "resnet20 seed 7 (1 epochs, 20 images): training" in first
    ckpt = out / "cls" / "teacher" / "resnet20_seed7" / "student_best"
    mtime = ckpt.stat().st_mtime_ns

    # Same teacher config: reused, not retrained; the students run again, in a fresh folder.
    assert demo.main(TINY + ["--out", str(out), "--methods", "vanilla", "KD"]) == 0
    second = capsys.readouterr().out
    assert "cached in" in second and "not retrained" in second and ": training" not in second
    assert ckpt.stat().st_mtime_ns == mtime
    _check_results(_rows(out), ["vanilla", "KD"], [7, 8])
    assert not (out / "cls" / "students" / "dkd_seed7").exists()

    # A changed teacher config retrains, and says so.
    assert demo.main(TINY + ["--out", str(out), "--teacher-epochs", "2", "--seeds", "1", "--methods", "vanilla"]) == 0
    assert "its config changed; retraining" in capsys.readouterr().out
    _check_results(_rows(out), ["vanilla"], [7])


@pytest.mark.parametrize("args", [["--seeds", "0"], ["--train-size", "5"], ["--teacher", "resnet999"],
                                  ["--methods", "KD"], ["--methods", "FOO"], ["--first-seed", "-1"]])
def test_demo_bad_input_one_error_line(demo, tmp_path, capsys, args):
    out = tmp_path / "demo"
    try:
        code = demo.main(args + ["--out", str(out)])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()


def test_demo_help(demo, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--first-seed" in text and "--train-size" in text
