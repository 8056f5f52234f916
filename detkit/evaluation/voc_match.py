"""The VOC devkit's greedy matching for all detections of one class at once (no per-detection loop).

The devkit walks the detections in descending score order; each takes the ground-truth box of
its image with the highest IoU (first one on ties). Over ``iou_thr`` and not difficult: a true
positive if no higher-scored detection took that box before, else a false positive; difficult:
neither; otherwise a false positive. The outcome of a detection depends only on its best box
and on whether an earlier detection in the order has the same best box, so it is computed with
array operations: best boxes from a padded [D, Gmax] IoU table (the ground truth of each
detection's image), then the first occurrence of each best box in score order.

Legend: D detections, G ground-truth boxes, Gmax most boxes of one image.
"""

from __future__ import annotations

import numpy as np

__all__ = ["broadcast_iou", "flatten_per_image", "match_class"]


def broadcast_iou(a: np.ndarray, b: np.ndarray, legacy_coords: bool = False) -> np.ndarray:
    """IoU of xyxy boxes a Float[...,4] and b Float[...,4] (broadcast); legacy adds 1 to sizes.

    The same operations in the same order as ``voc.pairwise_iou``, so the numbers are identical.
    """
    one = 1.0 if legacy_coords else 0.0
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + one
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + one
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[..., 2] - a[..., 0] + one) * (a[..., 3] - a[..., 1] + one)
    area_b = (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)
    union = area_a + area_b - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def flatten_per_image(groups: dict, index: dict) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``{image key: (boxes [N,4], column [N], ...)}`` -> (image index Int64[sum N] from ``index``,
    boxes Float64[sum N,4], concatenated columns), in the dict's order."""
    images, boxes, columns = [], [], []
    for key, (b, *cols) in groups.items():
        b = np.asarray(b, np.float64).reshape(-1, 4)
        images.append(np.full(len(b), index[key], np.int64))
        boxes.append(b)
        columns.append([np.asarray(c).reshape(-1) for c in cols])
    if not boxes:
        return np.zeros(0, np.int64), np.zeros((0, 4)), []
    return (np.concatenate(images), np.concatenate(boxes),
            [np.concatenate([c[i] for c in columns]) for i in range(len(columns[0]))])


def match_class(det_image: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, gt_image: np.ndarray,
                gt_boxes: np.ndarray, gt_difficult: np.ndarray, iou_thr: float,
                legacy_coords: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tp Float[D], fp Float[D]) in descending score order (stable: ties keep input order).

    ``det_image`` Int[D] / ``gt_image`` Int[G] say which image each box belongs to; the ground
    truth of one image keeps its given order (it decides IoU ties, as in the devkit).
    """
    order = np.argsort(-np.asarray(det_scores, np.float64), kind="stable")
    det_image, det_boxes = det_image[order], det_boxes[order]
    by_image = np.argsort(gt_image, kind="stable")
    gt_image, gt_boxes, gt_difficult = gt_image[by_image], gt_boxes[by_image], gt_difficult[by_image]
    start = np.searchsorted(gt_image, det_image, side="left")
    count = np.searchsorted(gt_image, det_image, side="right") - start
    width = int(count.max()) if len(count) else 0
    slot = np.arange(width)
    valid = slot[None, :] < count[:, None]                                     # [D, Gmax]
    idx = np.where(valid, start[:, None] + slot[None, :], 0)
    if width:
        ious = np.where(valid, broadcast_iou(det_boxes[:, None, :], gt_boxes[idx], legacy_coords), -np.inf)
        best = ious.argmax(1)
        best_iou = ious[np.arange(len(best)), best]
    else:
        best, best_iou = np.zeros(len(det_image), np.int64), np.full(len(det_image), -np.inf)
    gt_of = idx[np.arange(len(best)), best] if width else best
    over = best_iou > iou_thr
    candidate = over & ~gt_difficult[gt_of] if len(gt_difficult) else over & False
    tp = np.zeros(len(order))
    positions = np.flatnonzero(candidate)
    _, first = np.unique(gt_of[positions], return_index=True)  # earliest detection per GT box
    tp[positions[first]] = 1.0
    fp = (~over | candidate).astype(np.float64) - tp
    return tp, fp
