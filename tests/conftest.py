import os

import pytest
import torch

# CI machines have 2 cores. Under pytest-xdist (`make test` runs 2 workers) each worker takes one.
_default_threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("KD_TEST_THREADS", _default_threads)))
torch.manual_seed(0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    # The slow tests first: with two workers taking tests as they free up, a long test started last
    # leaves the other worker idle at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run a test from an empty working directory (./data, ./output resolve there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Detection tests: many small ops, faster on one intra-op thread (``KD_DET_TEST_THREADS``)."""
    from kd_det.testing import torch_threads

    with torch_threads(int(os.environ.get("KD_DET_TEST_THREADS", "1"))):
        yield
