"""Every tool's --help: a description, example command lines, help text for every option, and nothing on
stderr (no FutureWarning before the tool's own output)."""
import argparse
import glob
import os
import subprocess
import sys

import pytest
from kd_cls.testing import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = sorted(p for p in glob.glob(os.path.join(REPO, "tools", "*.py"))
               if "__main__" in open(p).read() and os.path.basename(p) != "demo_report.py")


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser(path, monkeypatch):
    """The tool's ArgumentParser, caught when the tool parses ``--help``."""
    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.syspath_prepend(os.path.dirname(path))
    mod = load_script(path, f"tool_{os.path.basename(path)[:-3]}")
    entry = (getattr(mod, "build_parser", None) or getattr(mod, "parse_args", None) or getattr(mod, "main", None)
             or getattr(mod, "train_main", None) or getattr(mod, "eval_main", None))
    assert entry is not None, f"{path}: no build_parser/parse_args/main to call"
    try:
        result = entry() if entry.__name__ == "build_parser" else entry(["--help"])
    except _Captured as c:
        return c.parser
    assert isinstance(result, argparse.ArgumentParser), f"{path}: {entry.__name__} did not parse its arguments"
    return result


@pytest.mark.parametrize("path", TOOLS, ids=[os.path.basename(p) for p in TOOLS])
def test_help_has_description_examples_and_option_help(path, monkeypatch):
    parser = _parser(path, monkeypatch)
    assert (parser.description or "").strip(), f"{path}: no description"
    text = parser.format_help()
    after = text.lower().split("example", 1)
    assert len(after) == 2, f"{path}: no examples in --help"
    commands = [l for l in after[1].splitlines() if l.strip().startswith(("python", "torchrun", "make"))]
    assert len(commands) >= 2, f"{path}: fewer than two example command lines"
    bare = [a.option_strings or [a.dest] for a in parser._actions
            if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not bare, f"{path}: options without help: {bare}"


@pytest.mark.slow
def test_help_prints_nothing_on_stderr():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {p: subprocess.Popen([sys.executable, p, "--help"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for p in TOOLS}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{path}: {err[-1000:]}"
        assert out.strip() and not err.strip(), f"{os.path.basename(path)} wrote to stderr: {err[:500]}"
