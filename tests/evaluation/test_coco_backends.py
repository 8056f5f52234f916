"""COCO evaluation backends: faster-coco-eval == pycocotools (stats, per-class AP, PR curves) on
every COCO case of the suite and on a generated val-like split; fallback; vectorised conversion."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from detkit.evaluation import (
    COCOEvaluator,
    DetectionTable,
    build_evaluator,
    coco_evaluate,
    evaluate_coco_files,
)
from detkit.evaluation.coco_backends import run_cocoeval
from detkit.evaluation.synthetic import results_to_predictions, synthetic_coco
from detkit.registry import ConfigError

from evaluation_helpers import LABEL_TO_CAT, direct_results, make_coco, make_gt, make_predictions

STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def direct(gt: dict, results: list[dict], iou_type: str, img_ids=None) -> COCOeval:
    """pycocotools used the documented way (loadRes of the result dicts)."""
    coco_gt = make_coco(gt)
    e = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
    if img_ids is not None:
        e.params.imgIds = img_ids
    e.evaluate(), e.accumulate(), e.summarize()
    return e


def assert_backends_equal(gt: dict, results: list[dict], iou_type: str = "bbox", img_ids=None) -> dict:
    """Both backends == direct pycocotools to 1e-12: 12 stats, precision array (PR curves, per-class AP)."""
    table = DetectionTable.from_results(results, iou_type)
    out = {b: run_cocoeval(make_coco(gt), table, iou_type, img_ids, b) for b in ("faster", "pycocotools")}
    ref = direct(gt, [{k: v for k, v in r.items() if iou_type == "bbox" or k != "bbox"} for r in results],
                 iou_type, img_ids) if results else None
    for res in out.values():
        if ref is not None:
            np.testing.assert_allclose(res.stats, ref.stats, rtol=0, atol=1e-12)
            np.testing.assert_allclose(res.precision, ref.eval["precision"], rtol=0, atol=1e-12)
            assert res.cat_ids == list(ref.params.catIds)
    np.testing.assert_allclose(out["faster"].stats, out["pycocotools"].stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["faster"].precision, out["pycocotools"].precision, rtol=0, atol=1e-12)
    metrics = {b: coco_evaluate(make_coco(gt), table, iou_type, img_ids, backend=b)[0] for b in out}
    assert metrics["faster"].keys() == metrics["pycocotools"].keys()
    for key, value in metrics["pycocotools"].items():
        assert metrics["faster"][key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    return metrics["faster"]


def disc_case():
    """Segm GT as compressed RLE (two discs), predictions as masks; the existing segm case."""
    h, w = 40, 50
    yy, xx = np.mgrid[:h, :w]
    discs = [((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)
             for cx, cy, r in ((12, 12, 8), (35, 25, 10), (13, 12, 8), (30, 25, 9), (5, 35, 4))]
    anns = []
    for i, m in enumerate(discs[:2]):
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": i + 1, "image_id": 1, "category_id": 3, "segmentation": rle,
                     "area": float(m.sum()), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
    gt = {"images": [{"id": 1, "width": w, "height": h}], "annotations": anns,
          "categories": [{"id": 3, "name": "blob"}]}
    results = [{"image_id": 1, "category_id": 3, "segmentation": mask_utils.encode(np.asfortranarray(m)),
                "score": s} for m, s in zip(discs[2:], (0.9, 0.8, 0.3))]
    return gt, results, torch.from_numpy(np.stack(discs[2:])).bool()


def test_suite_cases_identical():
    gt = make_gt()  # sparse unsorted category ids, a crowd region, image 5 without predictions
    results = direct_results(make_predictions(gt))
    metrics = assert_backends_equal(gt, results)
    assert 0.2 < metrics["bbox/AP"] < 0.95
    assert_backends_equal(gt, direct_results(make_predictions(gt, seed=3)), img_ids=[1, 3])  # subset
    empty = assert_backends_equal(gt, [])  # empty results
    assert empty["bbox/AP"] == 0.0
    seg_gt, seg_results, _ = disc_case()  # segm, RLE ground truth
    assert_backends_equal(seg_gt, seg_results, "segm")


def test_generated_polygon_segm_with_crowd_identical():
    gt, results = synthetic_coco(30, num_categories=5, dets_per_image=12, masks=True, seed=4)
    for ann in gt["annotations"][::7]:
        ann["iscrowd"] = 1  # crowd polygons
    metrics = assert_backends_equal(gt, results, "segm")
    assert 0.1 < metrics["segm/AP"] < 0.95


@pytest.mark.slow
def test_generated_several_hundred_images_identical_file_and_model_mode(tmp_path):
    gt, results = synthetic_coco(300, num_categories=20, dets_per_image=30, seed=1)
    assert len(results) > 8000 and any(a["iscrowd"] for a in gt["annotations"])
    metrics = assert_backends_equal(gt, results)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    assert evaluate_coco_files(tmp_path / "gt.json", tmp_path / "dt.json")[0] == metrics
    # the same detections as float32 tensors through process / evaluate give the same numbers
    ev = COCOEvaluator(ann_file=str(tmp_path / "gt.json"))
    for image_id, pred in results_to_predictions(gt, results).items():
        ev.process([{"image_id": image_id}], [pred])
    assert ev.evaluate() == metrics


def test_fallback_to_pycocotools_when_faster_coco_eval_is_missing(monkeypatch):
    import faster_coco_eval

    gt = make_gt()
    preds = make_predictions(gt)
    calls = []
    original = faster_coco_eval.COCOeval_faster
    monkeypatch.setattr(faster_coco_eval, "COCOeval_faster",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    ev = COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT)
    ev.process([{"image_id": k} for k in preds], list(preds.values()))
    expected = ev.evaluate()
    assert calls == [1]  # the default backend really is faster-coco-eval
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    with pytest.warns(UserWarning, match="falls back to pycocotools"):
        assert ev.evaluate() == pytest.approx(expected, abs=1e-12)
    assert calls == [1]
    ref = direct(gt, direct_results(preds), "bbox")
    assert [expected[f"bbox/{n}"] for n in STATS] == pytest.approx(list(ref.stats), abs=1e-12)


@pytest.mark.parametrize("missing", ["area", "iscrowd"])
@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_gt_without_area_or_iscrowd_is_an_error_as_in_pycocotools(missing, backend):
    """Edge case where the libraries differ: pycocotools raises KeyError on a GT annotation without
    'area' / 'iscrowd', faster-coco-eval evaluates it with guessed values. detkit follows pycocotools
    (one clear error naming the annotation) with both backends."""
    gt = make_gt()
    results = direct_results(make_predictions(gt))
    del gt["annotations"][2][missing]
    with pytest.raises(KeyError):
        direct(gt, results, "bbox")
    with pytest.raises(ValueError, match=f"annotation id 3 .*lacks {missing}"):
        coco_evaluate(make_coco(gt), results, backend=backend)


def test_process_converts_tensors_like_the_result_dicts():
    gt = make_gt()
    preds = make_predictions(gt)
    ev = COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT)
    ev.process([{"image_id": 2}], [preds[2]])
    table = ev._results[2]
    ref = direct_results({2: preds[2]})
    assert table.annotations("bbox") == [dict(r, id=i + 1, area=r["bbox"][2] * r["bbox"][3], iscrowd=0)
                                         for i, r in enumerate(ref)]
    seg_gt, seg_results, masks = disc_case()
    ev = COCOEvaluator(ann_file=make_coco(seg_gt), iou_types=("bbox", "segm"))
    pred = {"boxes": torch.tensor([[4.0, 4, 21, 20], [21, 16, 39, 34], [1, 31, 9, 39]]),
            "scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.zeros(3, dtype=torch.int64)}
    ev.process([{"image_id": 1}], [dict(pred, masks=masks.float()[:, None] * 0.8)])  # [K,1,H,W] probabilities
    assert ev._results[1].rles == [r["segmentation"] for r in seg_results]


def test_backend_option_config_and_errors(tmp_path):
    gt = make_gt()

    class FakeDataset:
        class_names = ["kite", "cat", "dog"]
        label_to_cat_id = LABEL_TO_CAT

        def coco_gt(self):
            return make_coco(gt)

    ev = build_evaluator({"type": "COCOEvaluator", "backend": "pycocotools"}, FakeDataset())
    assert ev.backend == "pycocotools"
    with pytest.raises(ConfigError, match="backend"):
        build_evaluator({"type": "COCOEvaluator", "backend": "fast"}, FakeDataset())
    (tmp_path / "dt.json").write_text(json.dumps([{"image_id": 1, "category_id": 3, "score": 0.5}]))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="detection 0 lacks"):
        evaluate_coco_files(tmp_path / "gt.json", tmp_path / "dt.json")


@pytest.mark.parametrize("field", ["score", "bbox"])
def test_nan_detections_scored_as_pycocotools(field):
    """Edge case where the libraries differ: a NaN score makes faster-coco-eval raise, a NaN box
    width changes its AP (by 0.2 on this case); pycocotools scores both. detkit gives
    pycocotools' numbers (it evaluates such detections with pycocotools, with a warning)."""
    gt, results = synthetic_coco(40, num_categories=5, dets_per_image=10, seed=3)
    for r in results[::9]:
        if field == "score":
            r["score"] = float("nan")
        else:
            r["bbox"][2] = float("nan")
    ref = direct(gt, results, "bbox")
    with pytest.warns(UserWarning, match="NaN"):
        metrics = coco_evaluate(make_coco(gt), results, backend="faster")[0]
    assert [metrics[f"bbox/{n}"] for n in STATS] == pytest.approx(list(ref.stats), abs=1e-12)
