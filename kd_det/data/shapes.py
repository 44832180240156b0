"""A COCO-format dataset of simple shapes, generated on the fly (no download).

Each ~128 px image holds 1-4 non-overlapping filled shapes (circle, square,
triangle) in random colours on a noisy background. Boxes are the exact
extents of the drawn polygons; masks are those polygons.

Harder variants, all off by default (the defaults write the same files as
before, byte for byte): ``scale_range`` (shape radius as fractions of the
image side), ``occlusion`` (how far shapes may overlap: the later one hides
part of the earlier, whose box and mask stay those of its whole polygon),
``clutter`` (up to that many unannotated distractors per image: lines,
outlines and filled pentagons/hexagons, drawn before the shapes) and
``contrast`` (1.0: shapes always brighter than the background; lower values
let their colours approach it).

Two category sets:

* ``"shapes"``: 3 categories (ids 1-3), written to
  ``<root>/shapes/{annotations/instances_{train,val}.json, train/, val/}`` and
  registered as ``shapes_train`` / ``shapes_val``.
* ``"coco"``: COCO's 80 category ids and names, the shapes mapped onto three of
  them, written like COCO 2017 to
  ``<root>/coco/{annotations/instances_{train,val}2017.json, train2017/, val2017/}``
  so that detectron2's builtin ``coco_2017_train`` / ``coco_2017_val`` read it
  when ``DETECTRON2_DATASETS=<root>``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["SHAPES", "COCO_MAPPING", "make_shapes_dataset", "split_paths"]

SHAPES = ("circle", "square", "triangle")
# Shape -> COCO category name, when written with COCO's categories.
COCO_MAPPING = {"circle": "sports ball", "square": "tv", "triangle": "kite"}


def split_paths(root: str, categories: str, split: str) -> Tuple[str, str]:
    """``(json_file, image_root)`` of one split (``"train"`` or ``"val"``)."""
    if categories == "coco":
        base = os.path.join(root, "coco")
        return os.path.join(base, "annotations", f"instances_{split}2017.json"), os.path.join(base, f"{split}2017")
    if categories == "shapes":
        base = os.path.join(root, "shapes")
        return os.path.join(base, "annotations", f"instances_{split}.json"), os.path.join(base, split)
    raise ValueError(f"unknown categories {categories!r}. Valid choices: shapes, coco")


def _category_table(categories: str) -> Tuple[List[Dict], Dict[str, int]]:
    if categories == "shapes":
        cats = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
        return cats, {n: i + 1 for i, n in enumerate(SHAPES)}
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    cats = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
    by_name = {c["name"]: c["id"] for c in cats}
    return cats, {s: by_name[COCO_MAPPING[s]] for s in SHAPES}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices ``(K, 2)`` in pixels (x, y) of a shape of circumradius ``r``."""
    if kind == "circle":
        k, angle = 24, 0.0
    elif kind == "square":
        k, angle = 4, math.pi / 4  # axis-aligned
    else:
        k = 3
    t = angle + np.arange(k) * 2 * math.pi / k
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int, scale_range, low: int) -> None:
    """Up to ``count`` unannotated distractors: a line, an outline, or a filled pentagon/hexagon."""
    import cv2

    size = img.shape[0]
    for _ in range(int(rng.integers(0, count + 1))):
        color = tuple(int(c) for c in rng.integers(low, 256, size=3))
        kind = int(rng.integers(3))
        r = float(rng.uniform(size * scale_range[0], size * scale_range[1]))
        cx, cy = rng.uniform(0, size, size=2)
        if kind == 0:
            a = float(rng.uniform(0, math.pi))
            d = np.array([math.cos(a), math.sin(a)]) * r
            p0, p1 = np.round([cx, cy] - d).astype(int), np.round([cx, cy] + d).astype(int)
            cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), color, 1 + int(rng.integers(2)))
        else:
            k = 5 + int(rng.integers(2))
            t = float(rng.uniform(0, 2 * math.pi)) + np.arange(k) * 2 * math.pi / k
            poly = np.round(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)).astype(np.int32)
            if kind == 1:
                cv2.polylines(img, [poly], True, color, 1)
            else:
                cv2.fillPoly(img, [poly], color)


def _render(rng: np.random.Generator, size: int, max_objects: int, scale_range=(0.08, 0.22),
            occlusion: float = 0.0, clutter: int = 0, contrast: float = 1.0):
    import cv2

    img = np.full((size, size, 3), rng.integers(0, 80, size=3), dtype=np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, size=img.shape), 0, 255).astype(np.uint8)
    # Colours from [low, 256): 120 keeps every shape brighter than the background (at most 80 + 12).
    low = int(round(120 * contrast))
    if clutter:
        _clutter(rng, img, clutter, scale_range, low)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            r = float(rng.uniform(size * scale_range[0], size * scale_range[1]))
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - px, cy - py) > (r + pr) * (1 - occlusion) + 2 for px, py, pr in placed):
                break
        else:
            continue
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        poly = np.round(_polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))).astype(np.int32)
        color = tuple(int(c) for c in rng.integers(low, 256, size=3))
        cv2.fillPoly(img, [poly], color)
        placed.append((cx, cy, r))
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0) + 1  # fillPoly covers the last pixel row/column
        objects.append((kind, poly, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    return img, objects


def make_shapes_dataset(
    root: str,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int = 128,
    categories: str = "shapes",
    max_objects: int = 4,
    seed: int = 0,
    *,
    scale_range: Tuple[float, float] = (0.08, 0.22),
    occlusion: float = 0.0,
    clutter: int = 0,
    contrast: float = 1.0,
) -> Dict[str, Tuple[str, str]]:
    """Write the dataset under ``root``; returns ``{split: (json_file, image_root)}``.

    Deterministic for a given ``seed``. Existing files are overwritten. The
    keyword-only options make it harder (see the module docstring); their
    defaults reproduce the original dataset exactly.
    """
    import cv2

    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi < 0.5:
        raise ValueError(f"scale_range must satisfy 0 < low <= high < 0.5 (radius / image side), got {scale_range}")
    if not 0 <= occlusion < 1:
        raise ValueError(f"occlusion must be in [0, 1), got {occlusion}")
    if clutter < 0:
        raise ValueError(f"clutter must be >= 0, got {clutter}")
    if not 0 <= contrast <= 1:
        raise ValueError(f"contrast must be in [0, 1], got {contrast}")

    cats, shape_ids = _category_table(categories)
    rng = np.random.default_rng(seed)
    out = {}
    ann_id = 1
    for split, n in (("train", num_train), ("val", num_val)):
        json_file, image_root = split_paths(root, categories, split)
        os.makedirs(image_root, exist_ok=True)
        os.makedirs(os.path.dirname(json_file), exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img, objects = _render(rng, image_size, max_objects, (lo, hi), occlusion, clutter, contrast)
            name = f"{split}_{i:06d}.png"
            cv2.imwrite(os.path.join(image_root, name), img[:, :, ::-1])  # RGB -> BGR for cv2
            images.append({"id": i + 1, "file_name": name, "height": image_size, "width": image_size})
            for kind, poly, box in objects:
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": i + 1,
                        "category_id": shape_ids[kind],
                        "bbox": box,
                        "area": float(abs(cv2.contourArea(poly.astype(np.float32)))),
                        "segmentation": [poly.astype(float).reshape(-1).tolist()],
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
        tmp = json_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)
        os.replace(tmp, json_file)
        out[split] = (json_file, image_root)
    return out
