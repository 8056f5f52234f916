"""COCOEvaluator against pycocotools' COCOeval run directly on the same detections."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from detkit.evaluation import COCOEvaluator, build_evaluator, evaluate_coco_files
from detkit.registry import ConfigError

from evaluation_helpers import LABEL_TO_CAT, NAMES, direct_results, make_coco, make_gt, make_predictions

STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def direct_cocoeval(gt: dict, results: list[dict], iou_type: str = "bbox") -> COCOeval:
    coco_gt = make_coco(gt)
    e = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
    e.evaluate()
    e.accumulate()
    e.summarize()
    return e


def run_evaluator(evaluator, preds: dict[int, dict], batch: int = 2) -> dict:
    evaluator.reset()
    items = list(preds.items())
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        evaluator.process([{"image_id": k} for k, _ in chunk], [p for _, p in chunk])
    return evaluator.evaluate()


def test_equals_direct_cocoeval_all_stats_and_per_class():
    gt = make_gt()
    preds = make_predictions(gt)
    ref = direct_cocoeval(gt, direct_results(preds))
    ev = COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT, class_names=NAMES)
    metrics = run_evaluator(ev, preds)
    assert 0.2 < ref.stats[0] < 0.95  # a non-trivial case
    for name, value in zip(STATS, ref.stats):
        assert metrics[f"bbox/{name}"] == pytest.approx(value, abs=1e-9), name
    # per-class AP: mean of precision over IoUs and recall thresholds, area all, 100 dets
    for k, cat in enumerate(ref.params.catIds):
        p = ref.eval["precision"][:, :, k, 0, 2]
        expected = p[p > -1].mean()
        name = NAMES[LABEL_TO_CAT.index(cat)]
        assert metrics[f"bbox/AP-{name}"] == pytest.approx(expected, abs=1e-9)
    assert "Average Precision" in ev.report() and "kite" in ev.report()


def test_perfect_predictions_give_ap_one():
    gt = make_gt()
    preds = {}
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        preds[img["id"]] = {"boxes": boxes.reshape(-1, 4), "scores": torch.ones(len(anns)),
                            "labels": torch.tensor([LABEL_TO_CAT.index(a["category_id"]) for a in anns])}
    metrics = run_evaluator(COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT), preds)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[f"bbox/{name}"] == pytest.approx(1.0, abs=1e-9)
    for name in NAMES:
        assert metrics[f"bbox/AP-{name}"] == pytest.approx(1.0, abs=1e-9)


def test_no_predictions_gives_zero_without_crash():
    gt = make_gt()
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)}
    ev = COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT)
    metrics = run_evaluator(ev, {img["id"]: empty for img in gt["images"]})
    assert metrics["bbox/AP"] == 0.0 and metrics["bbox/AR100"] == 0.0
    # nothing processed at all (an empty shard / a run with no val batches) also works
    ev.reset()
    assert ev.evaluate()["bbox/AP50"] == 0.0


def test_only_processed_images_are_scored():
    gt = make_gt()
    preds = make_predictions(gt)
    subset = {k: preds[k] for k in (1, 3)}
    coco_gt = make_coco(gt)
    ref = COCOeval(coco_gt, coco_gt.loadRes(direct_results(subset)), "bbox")
    ref.params.imgIds = [1, 3]
    ref.evaluate(), ref.accumulate(), ref.summarize()
    metrics = run_evaluator(COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT), subset)
    assert metrics["bbox/AP"] == pytest.approx(ref.stats[0], abs=1e-9)


def test_two_shards_with_duplicate_image_equal_one_evaluator():
    """What evaluate() merges under DDP: shards, with a padded duplicate image, keep first copy."""
    from detkit.evaluation._dist import merge_per_image

    gt = make_gt()
    preds = make_predictions(gt)
    one = COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT)
    expected = run_evaluator(one, preds)
    a, b = (COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT) for _ in range(2))
    ids = sorted(preds)
    a.process([{"image_id": i} for i in ids[::2]], [preds[i] for i in ids[::2]])
    b.process([{"image_id": i} for i in ids[1::2] + [ids[0]]], [preds[i] for i in ids[1::2] + [ids[0]]])
    merged = merge_per_image([a._results, b._results])
    metrics, _ = a._score(merged)
    assert metrics == expected


def test_results_json_vs_annotation_json(tmp_path):
    gt = make_gt()
    results = direct_results(make_predictions(gt, seed=3))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    metrics, report = evaluate_coco_files(tmp_path / "gt.json", tmp_path / "dt.json")
    ref = direct_cocoeval(gt, results)
    assert [metrics[f"bbox/{n}"] for n in STATS] == pytest.approx(list(ref.stats), abs=1e-9)
    assert "IoU=0.50:0.95" in report
    (tmp_path / "empty.json").write_text("[]")
    assert evaluate_coco_files(tmp_path / "gt.json", tmp_path / "empty.json")[0]["bbox/AP"] == 0.0
    with pytest.raises(FileNotFoundError):
        evaluate_coco_files(tmp_path / "gt.json", tmp_path / "missing.json")


def test_segm_equals_direct_cocoeval():
    h, w = 40, 50
    yy, xx = np.mgrid[:h, :w]
    disc = lambda cx, cy, r: ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)  # noqa: E731
    gt_masks = [disc(12, 12, 8), disc(35, 25, 10)]
    anns = []
    for i, m in enumerate(gt_masks):
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": i + 1, "image_id": 1, "category_id": 3, "segmentation": rle,
                     "area": float(m.sum()), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
    gt = {"images": [{"id": 1, "width": w, "height": h}], "annotations": anns,
          "categories": [{"id": 3, "name": "blob"}]}
    pred_masks = torch.from_numpy(np.stack([disc(13, 12, 8), disc(30, 25, 9), disc(5, 35, 4)])).bool()
    pred = {"boxes": torch.tensor([[4.0, 4, 21, 20], [21, 16, 39, 34], [1, 31, 9, 39]]),
            "scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.zeros(3, dtype=torch.int64),
            "masks": pred_masks}
    ev = COCOEvaluator(ann_file=make_coco(gt), iou_types=("bbox", "segm"))
    metrics = run_evaluator(ev, {1: pred})
    results = []
    for m, s in zip(pred_masks.numpy().astype(np.uint8), [0.9, 0.8, 0.3]):
        rle = mask_utils.encode(np.asfortranarray(m))
        results.append({"image_id": 1, "category_id": 3, "segmentation": rle, "score": s})
    ref = direct_cocoeval(gt, results, "segm")
    assert [metrics[f"segm/{n}"] for n in STATS] == pytest.approx(list(ref.stats), abs=1e-9)
    assert "bbox/AP" in metrics and "segm/AP-blob" in metrics


def test_build_evaluator_from_dataset_and_errors(tmp_path):
    gt = make_gt()

    class FakeDataset:
        class_names = NAMES
        label_to_cat_id = LABEL_TO_CAT

        def coco_gt(self):
            return make_coco(gt)

    ev = build_evaluator({"type": "COCOEvaluator", "pr_curve_dir": str(tmp_path / "pr")}, FakeDataset())
    metrics = run_evaluator(ev, make_predictions(gt))
    assert "bbox/AP-kite" in metrics
    assert (tmp_path / "pr" / "bbox_pr_kite.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="ann_file"):
        build_evaluator({"type": "COCOEvaluator"}, None)
    class MaskOnlyDataset:
        class_names = ["background", "a"]

        def coco_gt(self):
            raise NotImplementedError("no boxes")

    with pytest.raises(ConfigError, match="SegEvaluator"):
        build_evaluator({"type": "COCOEvaluator"}, MaskOnlyDataset())
    with pytest.raises(ConfigError, match="did you mean 'COCOEvaluator'"):
        build_evaluator({"type": "COCOEvaluatr"}, FakeDataset())
    with pytest.raises(ValueError, match="outside 0..2"):
        ev.process([{"image_id": 1}], [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                         "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="not in the evaluator's ground truth"):
        ev.process([{"image_id": 99}], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                          "labels": torch.zeros(0, dtype=torch.int64)}])


def test_class_without_gt_has_nan_ap():
    gt = make_gt()
    gt["categories"].append({"id": 99, "name": "ghost"})
    ev = COCOEvaluator(ann_file=make_coco(gt))
    metrics = run_evaluator(ev, {1: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                     "labels": torch.zeros(0, dtype=torch.int64)}})
    assert math.isnan(metrics["bbox/AP-ghost"])
