"""Generated datasets in the real on-disk formats, for tests, benchmarks and smoke runs.

One writer per format, used by the test suite, ``tools/benchmark.py`` and
``tools/make_fake_imagefolder.py``. The images are noise (accuracy means
nothing); the files are what the loaders read from a real download:

* :func:`write_cifar100`: ``<root>/cifar-100-python/{train,test}`` pickles;
* :func:`make_imagenet_tree`: ``<root>/imagenet/{train,val}/<wnid>/*.JPEG``;
* :func:`make_tiny_imagenet_tree`: ``<root>/tiny-imagenet-200`` as distributed
  (``train/<wnid>/images``, ``val/images`` + ``val/val_annotations.txt``, ``wnids.txt``).

Two helpers for tests that drive the tools: :func:`load_script` imports a ``tools/*.py`` script, and
:func:`default_sigint` lets a child process started for a Ctrl-C test receive it.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from types import ModuleType
from typing import List, Tuple

import numpy as np

__all__ = ["wnids", "write_cifar100", "make_imagenet_tree", "make_tiny_imagenet_tree", "load_script", "default_sigint"]


def wnids(n: int) -> List[str]:
    """``n`` ImageNet-style class folder names: ``n10000000``, ``n10000001``, ..."""
    return [f"n{10000000 + i:08d}" for i in range(n)]


def write_cifar100(root: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """CIFAR-100 python-format pickles (``data`` (N, 3072) uint8 as R, G, B planes; ``fine_labels``
    ``i % 100``) under ``<root>/cifar-100-python``; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(n)],
            "coarse_labels": [i % 20 for i in range(n)],
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": split,
        }
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(entry, f)
    return folder


def _save_jpeg(path: str, rng: np.random.Generator, size: Tuple[int, int]) -> None:
    from PIL import Image

    w, h = size
    # Smooth noise (upsampled from a coarse grid) compresses and decodes like a photo; white noise does not.
    small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=90)


def make_imagenet_tree(root: str, classes: int = 2, per_class: int = 2, val_per_class: int = 1,
                       size: Tuple[int, int] = (64, 48), seed: int = 0) -> str:
    """``<root>/imagenet/{train,val}/<wnid>/<wnid>_<i>.JPEG`` of ``size`` (w, h); returns ``<root>/imagenet``.

    The images need not be 224 px: the transforms resize them, as for real ImageNet.
    """
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "imagenet")
    for split, n in (("train", per_class), ("val", val_per_class)):
        for wnid in wnids(classes):
            d = os.path.join(base, split, wnid)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                _save_jpeg(os.path.join(d, f"{wnid}_{i}.JPEG"), rng, size)
    return base


def make_tiny_imagenet_tree(root: str, classes: int = 2, per_class: int = 2, val_per_class: int = 1,
                            seed: int = 0) -> str:
    """``<root>/tiny-imagenet-200`` in the distributed layout, 64x64 images; returns its path.

    The validation images are ``val_0.JPEG, val_1.JPEG, ...``, ``val_per_class`` of
    each class in the order of ``wnids.txt``.
    """
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    names = wnids(classes)
    for wnid in names:
        d = os.path.join(base, "train", wnid, "images")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            for i in range(per_class):
                _save_jpeg(os.path.join(d, f"{wnid}_{i}.JPEG"), rng, (64, 64))
                f.write(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
    vdir = os.path.join(base, "val", "images")
    os.makedirs(vdir, exist_ok=True)
    k = 0
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for wnid in names:
            for _ in range(val_per_class):
                name = f"val_{k}.JPEG"
                _save_jpeg(os.path.join(vdir, name), rng, (64, 64))
                f.write(f"{name}\t{wnid}\t0\t0\t63\t63\n")
                k += 1
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return base


def load_script(path: str, name: str) -> ModuleType:
    """A script that is not in a package (``tools/*.py``) imported as module ``name``, for tests to call."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test will interrupt: a shell starts background jobs (CI's, say) with
    SIGINT ignored and a child inherits that, so without this the test's Ctrl-C would never reach it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
