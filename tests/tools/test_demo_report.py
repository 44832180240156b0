"""tools/demo_report.py: the table's paired gain and its standard error, and two demos writing one results.json
at once (make demo runs them side by side) without losing each other's rows."""
import json
import math
import multiprocessing
import os

import pytest
from kd_cls.testing import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def report():
    return load_script(os.path.join(REPO, "tools", "demo_report.py"), "demo_report")


def _row(method, seed, value, metric="top1"):
    return {"role": "student", "model": "m", "method": method, "seed": seed, "metric": metric, "value": value}


def test_gain_is_the_mean_of_paired_differences_with_their_standard_error(report):
    rows = [_row("vanilla", s, v) for s, v in enumerate([80.0, 82.0, 90.0])]
    rows += [_row("KD", s, v) for s, v in enumerate([81.0, 85.0, 92.0])]  # differences 1, 3, 2
    kd = next(s for s in report.summarize(rows) if s["method"] == "KD")
    assert kd["gain"] == pytest.approx(2.0) and kd["paired"] == 3
    assert kd["gain_se"] == pytest.approx(1.0 / math.sqrt(3))  # std of (1, 3, 2) is 1
    assert kd["std"] == pytest.approx(5.5677643628300219)


def _writer(report_path, out, metric, n):
    mod = load_script(report_path, "demo_report_w")
    rows = []
    for i in range(n):
        rows.append(_row("vanilla", i, float(i), metric))
        mod.replace_rows(out, rows, metric)


def test_two_demos_writing_at_once_keep_every_row(report, tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = os.path.join(REPO, "tools", "demo_report.py")
    procs = [ctx.Process(target=_writer, args=(path, str(tmp_path), m, 60)) for m in ("top1", "box_AP")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    for metric in ("top1", "box_AP"):
        assert sorted(r["seed"] for r in rows if r["metric"] == metric) == list(range(60))
