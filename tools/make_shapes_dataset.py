#!/usr/bin/env python
"""Generate the COCO-format shapes dataset (circles, squares, triangles with exact boxes and masks).

examples:
  python tools/make_shapes_dataset.py --root datasets                    # shapes_train / shapes_val
  python tools/make_shapes_dataset.py --root datasets --categories coco  # read as coco_2017_{train,val}
  export DETECTRON2_DATASETS=datasets
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
                   help="folder to write under (default: $DETECTRON2_DATASETS, else ./datasets)")
    p.add_argument("--categories", choices=["shapes", "coco"], default="shapes",
                   help="shapes: 3 classes under <root>/shapes; coco: COCO's 80 ids in the COCO 2017 layout")
    p.add_argument("--num-train", type=int, default=400, help="training images (default 400)")
    p.add_argument("--num-val", type=int, default=100, help="validation images (default 100)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    from kd_det.data.shapes import make_shapes_dataset  # after parsing: --help answers without detectron2

    out = make_shapes_dataset(a.root, a.num_train, a.num_val, a.image_size, a.categories, seed=a.seed)
    for split, (js, img) in out.items():
        print(f"{split}: {js} ({img})")


if __name__ == "__main__":
    main()
