"""COCO ``segmentation`` polygons through ``detkit.data.polygons``: the same masks as pycocotools'
``annToMask`` for real polygons (several parts, RLE, crowd), and no crash / traceback for what
pycocotools cannot take (coordinates near 1e9 crashed the process, 2-point polygons raised
TypeError, text values)."""

import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detkit.data import CocoDetection
from detkit.errors import DatasetError

H, W = 27, 41


def _dataset(tmp_path, segmentations, **options):
    (tmp_path / "img").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((H, W, 3), np.uint8))
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100.0,
             "iscrowd": int(isinstance(seg, dict)), "segmentation": seg}
            for i, seg in enumerate(segmentations)]
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}], "annotations": anns,
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    return CocoDetection("img", "a.json", root=str(tmp_path), **options)


def test_masks_equal_ann_to_mask(tmp_path):
    rng = np.random.default_rng(1)
    star = [float(v) for v in (20 + rng.uniform(3, 12, 14)[:, None]
                               * np.stack([np.cos(np.linspace(0, 6, 14)), np.sin(np.linspace(0, 6, 14))], 1)
                               + [0, -6]).reshape(-1)]
    two_parts = [[1, 1, 9, 2, 4, 8], [30, 20, 40, 18, 36, 26.5, 31, 25]]
    beyond = [[-15, -4, 60, 3, 12, 40]]                         # partly outside the image
    crowd = mask_utils.encode(np.asfortranarray((rng.random((H, W)) > 0.7).astype(np.uint8)))
    crowd["counts"] = crowd["counts"].decode("ascii")
    segmentations = [[star], two_parts, beyond, crowd]
    ds = _dataset(tmp_path, segmentations, instance_masks=True, with_masks=True)
    _, target = ds[0]
    for mask, ann in zip(target["masks"].numpy(), ds.coco.loadAnns([1, 2, 3, 4])):
        assert np.array_equal(mask, ds.coco.annToMask(ann).astype(bool)), ann["id"]
    assert target["masks"][1].sum() > 20 and target["masks"][3].sum() > 100


def test_what_pycocotools_cannot_take(tmp_path):
    huge = [[0, 0, 1e9, 0, 0, 1e9]]                            # crashed the process (segfault)
    two_points = [[3, 3, 10, 10]]                              # pycocotools: TypeError
    ds = _dataset(tmp_path, [huge, two_points, [[5, 5, 15, 5, 5, float("nan")]]], instance_masks=True,
                  with_masks=True)
    _, target = ds[0]
    masks = target["masks"].numpy()
    assert masks[0].all() and not masks[1].any() and not masks[2].any()
    assert (target["sem_seg"].numpy() == 1).all()
    bad = _dataset(tmp_path, [[[1, 2, "x", 4, 5, 6]]], instance_masks=True)
    with pytest.raises(DatasetError, match=r"a\.json: annotation id 1 \(image id 1\): unreadable "
                                           r"'segmentation'"):
        bad[0]
