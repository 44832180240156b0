#!/usr/bin/env python3
"""Write a small random dataset in the ImageNet or Tiny-ImageNet folder layout.

For smoke runs and benchmarks of the 224 px and 64 px pipelines without the
real data (the images are noise; accuracy means nothing).

examples:
  python3 tools/make_fake_imagefolder.py --kind imagenet --root ./data --classes 4 --per-class 8
  python3 tools/train.py --cfg configs/imagenet/r34_r18/kd.yaml DATASET.ROOT ./data
  python3 tools/make_fake_imagefolder.py --kind tiny --root ./data
"""
from __future__ import annotations

import argparse

from kd_cls.testing import make_imagenet_tree, make_tiny_imagenet_tree


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("imagenet", "tiny"), required=True,
                   help="imagenet: <root>/imagenet/{train,val}/<wnid>/*.JPEG; "
                        "tiny: <root>/tiny-imagenet-200 as distributed")
    p.add_argument("--root", default="./data", help="folder to write under (default ./data)")
    p.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    p.add_argument("--per-class", type=int, default=8, help="training images per class (default 8)")
    p.add_argument("--val-per-class", type=int, default=2, help="validation images per class (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    if a.kind == "imagenet":
        out = make_imagenet_tree(a.root, a.classes, a.per_class, a.val_per_class, seed=a.seed)
    else:
        out = make_tiny_imagenet_tree(a.root, a.classes, a.per_class, a.val_per_class, seed=a.seed)
    print(out)


if __name__ == "__main__":
    main()
