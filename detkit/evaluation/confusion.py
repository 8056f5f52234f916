"""Detection confusion matrix with a background row and column.

Legend: C classes, N ground-truth boxes and K detections of one image, boxes ``xyxy`` in
original-image pixels.

The matrix ``M`` is Int64[C+1, C+1]: rows are the ground-truth class, columns the predicted
class, index C is *background* (MMDetection's ``confusion_matrix.py`` layout; Ultralytics plots
the transpose, predicted classes on the rows). Per image:

1. detections with ``score < score_thr`` are dropped (default 0.25, Ultralytics' ``conf``;
   MMDetection uses 0.3);
2. detections and ground truth are matched one-to-one at ``IoU >= iou_thr`` (default 0.5, the
   IoU of AP50 and MMDetection's ``tp_iou_thr``): first same-class pairs, then, among what is
   left, pairs of different classes, each pass greedily in order of decreasing IoU. Matching the
   right class first keeps a correct box that overlaps a little less than a wrong one on the
   diagonal, as AP50 counts it;
3. a matched pair adds 1 to ``M[gt class, predicted class]`` (the diagonal when they agree);
4. a ground-truth box left unmatched (missed) adds 1 to ``M[gt class, C]``, the background
   column;
5. a detection left unmatched (a false positive) adds 1 to ``M[C, predicted class]``, the
   background row, unless it overlaps an ignored box (crowd / difficult, IoU >= ``iou_thr``):
   such boxes are neither missed nor false positives, as in COCO and VOC evaluation.

``M[C, C]`` stays 0. The accumulator has the evaluator API (``reset`` / ``process`` /
``evaluate``), takes the targets of the data contract (boxes in the transformed image, mapped
back with ``scale`` / ``offset``) and gathers across DDP ranks, counting each image once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from . import _dist

__all__ = ["DetectionConfusionMatrix", "match_image"]


def _greedy_pairs(iou: np.ndarray, allowed: np.ndarray, iou_thr: float,
                  gt_free: np.ndarray, det_free: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (gt, det) pairs among ``allowed`` with IoU >= thr, highest IoU first.

    ``gt_free`` Bool[N] / ``det_free`` Bool[K] are updated in place.
    """
    candidates = np.argwhere(allowed & (iou >= iou_thr))
    order = np.argsort(-iou[candidates[:, 0], candidates[:, 1]], kind="stable")
    pairs = []
    for g, d in candidates[order]:
        if gt_free[g] and det_free[d]:
            gt_free[g] = det_free[d] = False
            pairs.append((int(g), int(d)))
    return pairs


def match_image(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_ignore: np.ndarray,
                det_boxes: np.ndarray, det_labels: np.ndarray, num_classes: int,
                iou_thr: float = 0.5) -> np.ndarray:
    """The (row, column) cells one image adds to the matrix, as Int64[M,2] (see the module doc).

    ``gt_boxes`` Float[N,4], ``gt_labels`` Int[N], ``gt_ignore`` Bool[N]; ``det_boxes``
    Float[K,4], ``det_labels`` Int[K] (already filtered by score).
    """
    bg = num_classes
    keep = ~gt_ignore
    boxes, labels = gt_boxes[keep], gt_labels[keep]
    iou = box_iou(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                  torch.as_tensor(det_boxes, dtype=torch.float64).reshape(-1, 4)).numpy()
    gt_free = np.ones(len(boxes), bool)
    det_free = np.ones(len(det_boxes), bool)
    same = labels[:, None] == det_labels[None, :]
    pairs = _greedy_pairs(iou, same, iou_thr, gt_free, det_free)
    pairs += _greedy_pairs(iou, ~same, iou_thr, gt_free, det_free)
    cells = [(int(labels[g]), int(det_labels[d])) for g, d in pairs]
    cells += [(int(c), bg) for c in labels[gt_free]]
    if gt_ignore.any() and det_free.any():
        ignored_iou = box_iou(torch.as_tensor(det_boxes[det_free], dtype=torch.float64),
                              torch.as_tensor(gt_boxes[gt_ignore], dtype=torch.float64)).numpy()
        on_ignored = (ignored_iou >= iou_thr).any(axis=1)
        det_free[np.flatnonzero(det_free)[on_ignored]] = False
    cells += [(bg, int(c)) for c in det_labels[det_free]]
    return np.asarray(cells, np.int64).reshape(-1, 2)


def _original_gt(target: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GT boxes of a target mapped to original pixels (``(t - offset) / scale``), labels, ignore."""
    boxes = torch.as_tensor(target["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
    scale = torch.as_tensor(target.get("scale", (1.0, 1.0)), dtype=torch.float64).reshape(2)
    offset = torch.as_tensor(target.get("offset", (0.0, 0.0)), dtype=torch.float64).reshape(2)
    boxes = (boxes - offset.repeat(2)) / scale.repeat(2)
    labels = torch.as_tensor(target["labels"]).reshape(-1).cpu().numpy().astype(np.int64)
    ignore = np.zeros(len(labels), bool)
    for key in ("iscrowd", "difficult"):
        if target.get(key) is not None:
            ignore |= torch.as_tensor(target[key]).reshape(-1).cpu().numpy().astype(bool)
    return boxes.numpy(), labels, ignore


class DetectionConfusionMatrix:
    """Accumulates :func:`match_image` cells over a val set; :meth:`evaluate` returns ``M``.

    Args:
        num_classes: C (labels 0..C-1; index C of the matrix is background).
        class_names: C names (default ``"0"``, ``"1"`` ...), with ``"background"`` appended
            in :attr:`names`.
        score_thr: detections below it are ignored (see the module doc).
        iou_thr: the IoU at which a detection and a ground-truth box match.
    """

    def __init__(self, *, num_classes: int, class_names: Sequence[str] | None = None,
                 score_thr: float = 0.25, iou_thr: float = 0.5):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.names = [*(class_names or [str(i) for i in range(num_classes)]), "background"]
        self.score_thr, self.iou_thr = float(score_thr), float(iou_thr)
        self.reset()

    def reset(self) -> None:
        self._cells: dict = {}
        self.matrix = np.zeros((self.num_classes + 1, self.num_classes + 1), np.int64)

    def process(self, targets: list[dict], predictions: list[dict]) -> None:
        """Add one batch: targets of the data contract, predictions in original pixels."""
        for target, pred in zip(targets, predictions):
            gt_boxes, gt_labels, gt_ignore = _original_gt(target)
            scores = torch.as_tensor(pred["scores"]).detach().reshape(-1).float().cpu()
            keep = (scores >= self.score_thr).numpy()
            det_boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64)
            det_boxes = det_boxes.reshape(-1, 4).numpy()[keep]
            det_labels = torch.as_tensor(pred["labels"]).reshape(-1).cpu().numpy().astype(np.int64)[keep]
            for name, labels in (("ground-truth", gt_labels), ("predicted", det_labels)):
                bad = labels[(labels < 0) | (labels >= self.num_classes)]
                if bad.size:
                    raise ValueError(f"image {target.get('image_id')}: {name} label {int(bad[0])} "
                                     f"outside 0..{self.num_classes - 1}")
            image_id = target.get("image_id", len(self._cells))
            self._cells[int(image_id)] = match_image(gt_boxes, gt_labels, gt_ignore, det_boxes,
                                                     det_labels, self.num_classes, self.iou_thr)

    def evaluate(self) -> np.ndarray:
        """Int64[C+1, C+1], rows ground truth, columns prediction (the same on every rank)."""
        merged = _dist.merge_per_image(_dist.all_gather_object(self._cells))
        matrix = np.zeros_like(self.matrix)
        for cells in merged.values():
            np.add.at(matrix, (cells[:, 0], cells[:, 1]), 1)
        self.matrix = matrix
        return matrix
