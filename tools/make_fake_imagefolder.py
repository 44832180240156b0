#!/usr/bin/env python3
"""Write a small random dataset in the ImageNet or Tiny-ImageNet folder layout.

For smoke runs and benchmarks of the 224 px and 64 px pipelines without the
real data (the images are noise; accuracy means nothing)::

    python3 tools/make_fake_imagefolder.py --kind imagenet --root ./data --classes 4 --per-class 8
    python3 tools/train.py --cfg configs/imagenet/r34_r18/kd.yaml DATASET.ROOT ./data

``--kind imagenet`` writes ``<root>/imagenet/{train,val}/<wnid>/*.JPEG``;
``--kind tiny`` writes ``<root>/tiny-imagenet-200`` as distributed
(``train/<wnid>/images``, ``val/images`` + ``val/val_annotations.txt``, ``wnids.txt``).
"""
from __future__ import annotations

import argparse
import os
from typing import List

import numpy as np
from PIL import Image


def _wnids(n: int) -> List[str]:
    return [f"n{10000000 + i:08d}" for i in range(n)]


def _save(path: str, rng: np.random.Generator, size) -> None:
    w, h = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def make_imagenet_tree(root: str, classes: int = 2, per_class: int = 2, val_per_class: int = 1,
                       size=(64, 48), seed: int = 0) -> str:
    """``<root>/imagenet/{train,val}/<wnid>/<i>.JPEG``; returns ``<root>/imagenet``.

    The images need not be 224 px: the transforms resize them, as for real ImageNet.
    """
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "imagenet")
    for split, n in (("train", per_class), ("val", val_per_class)):
        for wnid in _wnids(classes):
            d = os.path.join(base, split, wnid)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                _save(os.path.join(d, f"{wnid}_{i}.JPEG"), rng, size)
    return base


def make_tiny_imagenet_tree(root: str, classes: int = 2, per_class: int = 2, val_per_class: int = 1,
                            seed: int = 0) -> str:
    """``<root>/tiny-imagenet-200`` in the distributed layout, 64x64 images; returns its path."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    wnids = _wnids(classes)
    for wnid in wnids:
        d = os.path.join(base, "train", wnid, "images")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            for i in range(per_class):
                _save(os.path.join(d, f"{wnid}_{i}.JPEG"), rng, (64, 64))
                f.write(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
    vdir = os.path.join(base, "val", "images")
    os.makedirs(vdir, exist_ok=True)
    k = 0
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for wnid in wnids:
            for _ in range(val_per_class):
                name = f"val_{k}.JPEG"
                _save(os.path.join(vdir, name), rng, (64, 64))
                f.write(f"{name}\t{wnid}\t0\t0\t63\t63\n")
                k += 1
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    return base


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("imagenet", "tiny"), required=True)
    p.add_argument("--root", default="./data")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.kind == "imagenet":
        out = make_imagenet_tree(a.root, a.classes, a.per_class, a.val_per_class, seed=a.seed)
    else:
        out = make_tiny_imagenet_tree(a.root, a.classes, a.per_class, a.val_per_class, seed=a.seed)
    print(out)


if __name__ == "__main__":
    main()
