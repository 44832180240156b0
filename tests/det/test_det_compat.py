"""The placeholder for detectron2's compiled ops, and the shapes dataset generator."""
import json
import sys
import types

import numpy as np
import pytest

pytest.importorskip("detectron2")

from kd_det import compat  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_placeholder_only_without_compiled_ops(monkeypatch):
    real = types.ModuleType("detectron2._C")  # what a full build provides
    monkeypatch.setitem(sys.modules, "detectron2._C", real)
    assert compat.ensure_detectron2_ops() is False
    assert sys.modules["detectron2._C"] is real
    assert not compat.using_placeholder_ops()


def test_missing_op_is_named():
    placeholder = sys.modules.get("detectron2._C")
    if placeholder is None or not getattr(placeholder, "kd_placeholder", False):
        pytest.skip("detectron2 has its compiled ops here")
    with pytest.raises(compat.MissingCompiledOpError, match="'_C.nms_rotated' is not available"):
        placeholder.nms_rotated
    import torch
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(compat.MissingCompiledOpError, match="box_iou_rotated"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    # default_setup() calls collect_env_info(), which asks the compiled module for versions.
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


def test_numpy_aliases_for_detectron2():
    compat.ensure_detectron2_ops()
    assert np.float is float or np.float is np.float64
    assert np.asarray([1.5]).astype(np.int)[0] == 1


def test_shapes_dataset_boxes_and_masks(tmp_path):
    import cv2

    from kd_det.data.shapes import make_shapes_dataset

    out = make_shapes_dataset(str(tmp_path), num_train=4, num_val=2, image_size=64, categories="shapes", seed=3)
    json_file, image_root = out["train"]
    assert json_file.endswith("shapes/annotations/instances_train.json")
    data = json.load(open(json_file))
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle"]
    assert len(data["images"]) == 4 and data["annotations"]
    for ann in data["annotations"]:
        poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        x, y, w, h = ann["bbox"]
        # The box is the polygon's pixel extent (inclusive of its last row/column).
        assert (x, y) == tuple(poly.min(0)) and (x + w - 1, y + h - 1) == tuple(poly.max(0))
        img = cv2.imread(f"{image_root}/{data['images'][ann['image_id'] - 1]['file_name']}")
        mask = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(mask, [poly.astype(np.int32)], 1)
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x, y, x + w - 1, y + h - 1)


def test_coco_categories_match_detectron2_builtin(tmp_path):
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    from kd_det.data.shapes import COCO_MAPPING, make_shapes_dataset

    out = make_shapes_dataset(str(tmp_path), num_train=2, num_val=1, image_size=64, categories="coco")
    json_file, _ = out["val"]
    assert json_file.endswith("coco/annotations/instances_val2017.json")
    cats = json.load(open(json_file))["categories"]
    meta = _get_builtin_metadata("coco")
    assert [c["name"] for c in cats] == meta["thing_classes"]
    assert {c["name"] for c in cats} >= set(COCO_MAPPING.values())


def test_coco_json_dataset_named_in_config(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from kd_det.config import get_kd_cfg
    from kd_det.data import register_config_datasets
    from kd_det.data.shapes import make_shapes_dataset

    json_file, image_root = make_shapes_dataset(str(tmp_path), 2, 1, image_size=64, categories="shapes")["train"]
    cfg = get_kd_cfg(None, ["DATASETS.COCO_JSON", f"[['my_shapes_{tmp_path.name}', '{json_file}', '{image_root}']]"])
    register_config_datasets(cfg)
    name = f"my_shapes_{tmp_path.name}"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 2 and dicts[0]["annotations"]
    assert MetadataCatalog.get(name).thing_classes == ["circle", "square", "triangle"]
    missing = get_kd_cfg(None, ["DATASETS.COCO_JSON", "[['absent_set', 'no.json', 'imgs']]"])
    register_config_datasets(missing)
    with pytest.raises(FileNotFoundError, match="dataset 'absent_set': no.json not found"):
        DatasetCatalog.get("absent_set")
