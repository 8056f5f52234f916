"""COCO segm AP of predicted instance masks through COCOEvaluator equals a direct pycocotools
COCOeval run on the same masks (polygon and crowd-RLE ground truth, several images, a miss)."""

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.evaluation.coco import STAT_NAMES, COCOEvaluator

H, W = 48, 64


def _ground_truth() -> dict:
    g = np.random.default_rng(0)
    images, anns = [], []
    for img_id in (3, 8, 9):
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": H, "width": W})
        for _ in range(int(g.integers(2, 5))):
            x, y = g.uniform(0, W - 20), g.uniform(0, H - 20)
            w, h = g.uniform(8, 20), g.uniform(8, 20)
            poly = [x, y, x + w, y + 0.3 * h, x + 0.7 * w, y + h, x, y + 0.8 * h]
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([poly], H, W))))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(g.choice([2, 7])),
                         "segmentation": [poly], "area": area, "bbox": [x, y, w, h], "iscrowd": 0})
    crowd = np.zeros((H, W), np.uint8)
    crowd[30:46, 40:62] = 1
    column_major = crowd.flatten(order="F").astype(np.int64)
    starts = np.flatnonzero(np.diff(np.r_[0, column_major, 1 - column_major[-1]]))  # runs, 0s first
    counts = np.diff(np.r_[0, starts]).tolist()
    anns.append({"id": len(anns) + 1, "image_id": 8, "category_id": 7, "iscrowd": 1,
                 "area": float(crowd.sum()), "bbox": [40.0, 30.0, 22.0, 16.0],
                 "segmentation": {"size": [H, W], "counts": counts}})
    categories = [{"id": 2, "name": "a"}, {"id": 7, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": categories}


def _predictions(gt: dict) -> dict[int, dict]:
    """Per image: each GT mask shifted by a pixel or two (some with the wrong class), plus noise."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    g = torch.Generator().manual_seed(1)
    out = {}
    for img_id in (3, 8, 9):
        masks, labels = [], []
        for ann in coco.imgToAnns[img_id]:
            if ann["iscrowd"]:
                continue
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            masks.append(torch.from_numpy(coco.annToMask(ann)).roll(shift, dims=(0, 1)).bool())
            labels.append(0 if ann["category_id"] == 2 else 1)
        masks.append(torch.rand(H, W, generator=g) > 0.7)          # a noisy false positive
        labels.append(1)
        masks.append(torch.zeros(H, W, dtype=torch.bool))           # an empty mask
        labels.append(0)
        if img_id == 9:
            labels[0] = 1 - labels[0]                                # a wrong class
        stack = torch.stack(masks)
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(len(masks), 1)  # segm ignores the boxes
        out[img_id] = {"boxes": boxes, "scores": torch.rand(len(masks), generator=g),
                       "labels": torch.tensor(labels), "masks": stack}
    return out


def _direct_pycocotools(gt: dict, predictions: dict[int, dict]) -> np.ndarray:
    results = []
    for img_id, pred in predictions.items():
        arr = np.asfortranarray(pred["masks"].numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(arr)
        for rle, score, label in zip(rles, pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": img_id, "category_id": [2, 7][label], "segmentation": rle,
                            "score": score})
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


@pytest.mark.parametrize("backend", ["default", "pycocotools"])
def test_segm_ap_equals_a_direct_pycocotools_run(backend):
    gt = _ground_truth()
    predictions = _predictions(gt)
    kwargs = {} if backend == "default" else {"backend": "pycocotools"}
    evaluator = COCOEvaluator(ann_file=copy.deepcopy(gt), iou_types=("bbox", "segm"), **kwargs)
    for img_id, pred in predictions.items():
        evaluator.process([{"image_id": img_id}], [pred])
    metrics = evaluator.evaluate()
    expected = _direct_pycocotools(gt, predictions)
    assert 0.05 < expected[0] < 0.95 and expected[1] > 0.3   # neither trivial nor perfect
    for name, value in zip(STAT_NAMES, expected):
        assert metrics[f"segm/{name}"] == pytest.approx(value, abs=1e-9), name


def test_segm_ap_of_more_than_255_masks_equals_pycocotools():
    # 100 detections per image, as Mask R-CNN gives: pycocotools' mask.area overflows on long lists
    gt = _ground_truth()
    predictions = _predictions(gt)
    g = torch.Generator().manual_seed(2)
    for pred in predictions.values():
        extra = 100 - len(pred["labels"])
        pred["masks"] = torch.cat([pred["masks"], torch.rand(extra, H, W, generator=g) > 0.8])
        pred["labels"] = torch.cat([pred["labels"], torch.randint(0, 2, (extra,), generator=g)])
        pred["scores"] = torch.cat([pred["scores"], torch.rand(extra, generator=g) * 0.5])
        pred["boxes"] = pred["boxes"][:1].repeat(100, 1)
    evaluator = COCOEvaluator(ann_file=copy.deepcopy(gt), iou_types=("segm",))
    evaluator.process([{"image_id": i} for i in predictions], list(predictions.values()))
    metrics = evaluator.evaluate()
    for name, value in zip(STAT_NAMES, _direct_pycocotools(gt, predictions)):
        assert metrics[f"segm/{name}"] == pytest.approx(value, abs=1e-9), name
