"""SegEvaluator against a numpy reference confusion matrix and hand-computed metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detkit.evaluation import SegEvaluator, build_evaluator, confusion_matrix
from detkit.evaluation.segmentation import sem_seg_to_original

from evaluation_helpers import K, random_masks


def numpy_reference(preds, gts, k=K, ignore=255):
    m = np.zeros((k, k), np.int64)
    for p, g in zip(preds, gts):
        for gv, pv in zip(g.ravel(), p.ravel()):
            if gv != ignore:
                m[gv, pv] += 1
    tp = np.diag(m).astype(float)
    rows, cols = m.sum(1).astype(float), m.sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (rows + cols - tp)
        acc = tp / rows
    return m, {"PA": tp.sum() / m.sum(), "MPA": np.nanmean(acc), "mIoU": np.nanmean(iou),
               "FWIoU": sum(r / m.sum() * i for r, i in zip(rows, iou) if r > 0)}, iou, acc


def run(evaluator, preds, gts):
    evaluator.reset()
    for i, (p, g) in enumerate(zip(preds, gts)):
        evaluator.process([{"image_id": i, "sem_seg": torch.from_numpy(g)}],
                          [{"sem_seg": torch.from_numpy(p)}])
    return evaluator.evaluate()


def test_equals_numpy_reference_with_ignore_pixels():
    preds, gts = random_masks(5, 0)
    ev = SegEvaluator(num_classes=K, class_names=["bg", "a", "b", "c"])
    m = run(ev, preds, gts)
    ref_m, ref, iou, acc = numpy_reference(preds, gts)
    assert torch.equal(ev.matrix, torch.from_numpy(ref_m))
    for key, value in ref.items():
        assert m[f"sem_seg/{key}"] == pytest.approx(value, abs=1e-12)
    for name, i, a in zip(["bg", "a", "b", "c"], iou, acc):
        assert m[f"sem_seg/IoU-{name}"] == pytest.approx(i, abs=1e-12)
        assert m[f"sem_seg/Acc-{name}"] == pytest.approx(a, abs=1e-12)
    assert "mIoU" in ev.report()


def test_hand_computed_nan_rules():
    # class 2 never in GT but predicted once -> Acc NaN, IoU 0; class 3 absent everywhere -> NaN, NaN
    gt = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 2, 1, 3]])
    m = run(SegEvaluator(num_classes=K), [pred.numpy()], [gt.numpy()])
    assert m["sem_seg/PA"] == pytest.approx(2 / 3)
    assert m["sem_seg/IoU-0"] == pytest.approx(0.5) and m["sem_seg/IoU-1"] == 1.0
    assert m["sem_seg/IoU-2"] == 0.0 and math.isnan(m["sem_seg/IoU-3"])
    assert math.isnan(m["sem_seg/Acc-2"]) and math.isnan(m["sem_seg/Acc-3"])
    assert m["sem_seg/mIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["sem_seg/MPA"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["sem_seg/FWIoU"] == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 1.0)


def test_two_ranks_accumulate_like_one():
    preds, gts = random_masks(6, 1)
    one = SegEvaluator(num_classes=K)
    expected = run(one, preds, gts)
    a, b = SegEvaluator(num_classes=K), SegEvaluator(num_classes=K)
    run(a, preds[:4], gts[:4])
    run(b, preds[4:], gts[4:])
    assert torch.equal(a.matrix + b.matrix, one.matrix)
    a.matrix = a.matrix + b.matrix  # what all_reduce(SUM) does
    assert a.evaluate() == expected


def test_image_processed_twice_counts_once():
    preds, gts = random_masks(3, 4)
    expected = run(SegEvaluator(num_classes=K), preds, gts)
    ev = SegEvaluator(num_classes=K)
    run(ev, preds, gts)
    ev.process([{"image_id": torch.tensor(1), "sem_seg": torch.from_numpy(gts[1])}],
               [{"sem_seg": torch.from_numpy(preds[1])}])
    assert ev.evaluate() == expected


def test_errors_and_empty():
    ev = SegEvaluator(num_classes=K)
    with pytest.raises(ValueError, match="ground-truth label 7"):
        ev.process([{"image_id": 3, "sem_seg": torch.tensor([[7]])}], [{"sem_seg": torch.tensor([[0]])}])
    with pytest.raises(ValueError, match="predicted label 9"):
        confusion_matrix(torch.tensor([9]), torch.tensor([0]), K)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), K)
    ev.reset()
    assert math.isnan(ev.evaluate()["sem_seg/mIoU"])  # nothing processed: NaN, no crash


def test_resized_target_is_mapped_back_to_original():
    orig = torch.tensor([[0, 1], [2, 3]])
    # the pipeline doubled the image and letterboxed it with 1 pixel at the top
    transformed = torch.full((5, 4), 255)
    transformed[1:, :] = orig.repeat_interleave(2, 0).repeat_interleave(2, 1)
    meta = {"orig_size": torch.tensor([2, 2]), "scale": torch.tensor([2.0, 2.0]),
            "offset": torch.tensor([0.0, 1.0])}
    assert torch.equal(sem_seg_to_original(transformed, meta), orig)
    ev = SegEvaluator(num_classes=K)
    ev.process([dict(meta, sem_seg=transformed)], [{"sem_seg": orig}])
    assert ev.evaluate()["sem_seg/mIoU"] == 1.0


def test_build_from_config_with_dataset():
    class FakeSegDataset:
        class_names = ["background", "circle", "square", "triangle", "star"]
        ignore_index = 255

    ev = build_evaluator({"type": "SegEvaluator"}, FakeSegDataset())
    assert ev.num_classes == 5 and ev.class_names[1] == "circle"
    ev = build_evaluator({"type": "SegEvaluator", "num_classes": 3}, None)
    assert ev.num_classes == 3 and ev.class_names is None


@pytest.mark.parametrize("ignore_index", [255, -1])
def test_confusion_matrix_equals_numpy_for_uint8_and_negative_ignore(ignore_index):
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 21, (64, 48))
    gt[rng.random(gt.shape) < 0.1] = ignore_index
    pred = rng.integers(0, 21, gt.shape)
    keep = gt != ignore_index
    ref = np.bincount(gt[keep] * 21 + pred[keep], minlength=21 * 21).reshape(21, 21)
    dtype = torch.uint8 if ignore_index == 255 else torch.int64
    got = confusion_matrix(torch.from_numpy(pred).to(dtype), torch.from_numpy(gt).to(dtype), 21, ignore_index)
    assert got.dtype == torch.int64 and torch.equal(got, torch.from_numpy(ref))
    gt[0, 0] = 21
    with pytest.raises(ValueError, match="ground-truth label 21"):
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 21, ignore_index)
