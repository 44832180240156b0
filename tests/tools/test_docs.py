"""The README and docs/: the README is short and links every page; links resolve; and the commands marked
``<!-- test: runs -->`` run as written (from a folder that sees the repository's tools/ and configs/)."""
import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
MARK = "<!-- test: runs -->"


def _read(path):
    with open(path) as f:
        return f.read()


def runnable_blocks():
    """``[(page, block text)]`` of the fenced bash blocks right after the marker."""
    out = []
    for path in PAGES + [os.path.join(REPO, "README.md")]:
        for m in re.finditer(re.escape(MARK) + r"\s*```bash\n(.*?)```", _read(path), re.S):
            out.append((os.path.relpath(path, REPO), m.group(1)))
    return out


def test_readme_is_short_and_links_every_page():
    readme = _read(os.path.join(REPO, "README.md"))
    assert len(readme) <= 12000, len(readme)
    unlinked = [os.path.basename(p) for p in PAGES if f"docs/{os.path.basename(p)}" not in readme]
    assert not unlinked, f"pages the README does not link: {unlinked}"


def test_relative_links_resolve():
    broken = []
    for path in PAGES + [os.path.join(REPO, "README.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", _read(path)):
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                broken.append(f"{os.path.relpath(path, REPO)} -> {target}")
    assert not broken, broken


def test_some_blocks_are_marked():
    pages = {p for p, _ in runnable_blocks()}
    assert {"docs/getting_started.md", "docs/classification.md"} <= pages


@pytest.mark.slow
@pytest.mark.parametrize("page, block", runnable_blocks(), ids=[p for p, _ in runnable_blocks()])
def test_marked_commands_run_as_written(page, block, tmp_path):
    for name in ("tools", "configs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{page}:\n{block}\n--- stderr ---\n{proc.stderr[-3000:]}"
