"""Pascal VOC mAP, following the official devkit's ``voc_eval`` step by step.

Per class: detections of all images sorted by descending score; each is matched to the
ground-truth box of its image with the highest IoU. IoU > ``iou_thr`` with a not yet matched,
non-difficult box is a true positive; with an already matched one a false positive; with a
difficult box neither. Below the threshold it is a false positive. AP is the 11-point
interpolated precision (``voc07``) or the area under the monotone precision envelope (``voc12``).
``legacy_coords=True`` uses the devkit's inclusive pixel convention (width = x2 - x1 + 1).

Boxes are xyxy in original-image pixels. Legend: D detections, G ground-truth boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..registry import EVALUATORS, ConfigError, construct
from ..structures import boxes_to_original
from . import _dist
from .coco import dataset_coco_gt, load_coco
from .report import format_table, safe_filename, save_pr_curve
from .voc_match import flatten_per_image, match_class

__all__ = ["VOCEvaluator", "voc_ap", "voc_eval_class", "voc_eval_arrays", "pairwise_iou"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """AP from cumulative recall/precision arrays of the score-sorted detections."""
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if metric == "voc07":
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            reached = recall >= t
            ap += (precision[reached].max() if reached.any() else 0.0) / 11.0
        return float(ap)
    if metric != "voc12":
        raise ValueError(f"metric must be 'voc07' or 'voc12', got {metric!r}")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope (monotone non-increasing)
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def pairwise_iou(a: np.ndarray, b: np.ndarray, legacy_coords: bool = False) -> np.ndarray:
    """IoU Float[D,G] of xyxy boxes a Float[D,4], b Float[G,4]; legacy adds 1 to widths/heights."""
    one = 1.0 if legacy_coords else 0.0
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + one
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + one
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def voc_eval_class(dets: dict, gts: dict, iou_thr: float = 0.5, metric: str = "voc07",
                   legacy_coords: bool = False) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Devkit ``voc_eval`` for one class.

    Args:
        dets: {image_id: (boxes Float[D,4], scores Float[D])}.
        gts: {image_id: (boxes Float[G,4], difficult Bool[G])}; images missing have no GT.
    Returns:
        (recall, precision, AP, number of non-difficult GT); AP is NaN when that number is 0.
    """
    index = {key: i for i, key in enumerate(dict.fromkeys([*dets, *gts]))}
    det_image, det_boxes, (det_scores,) = flatten_per_image(dets, index) if dets else _NO_BOXES
    gt_image, gt_boxes, (difficult,) = flatten_per_image(gts, index) if gts else _NO_BOXES
    return voc_eval_arrays(det_image, det_boxes, det_scores.astype(np.float64), gt_image, gt_boxes,
                           difficult.astype(bool), iou_thr, metric, legacy_coords)


_NO_BOXES: tuple = (np.zeros(0, np.int64), np.zeros((0, 4)), [np.zeros(0)])


def voc_eval_arrays(det_image: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray,
                    gt_image: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray,
                    iou_thr: float = 0.5, metric: str = "voc07",
                    legacy_coords: bool = False) -> tuple[np.ndarray, np.ndarray, float, int]:
    """``voc_eval_class`` on flat arrays: image index Int[D] / Int[G] of every box (see voc_match)."""
    npos = int((~gt_difficult).sum())
    tp, fp = match_class(det_image, det_boxes, det_scores, gt_image, gt_boxes, gt_difficult, iou_thr,
                         legacy_coords)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    if npos == 0:
        return np.zeros_like(tp), np.zeros_like(tp), float("nan"), 0
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, voc_ap(recall, precision, metric), npos


def _image_key(image_id) -> int | str:
    """An image id as a dict key: VOC ids are strings (``2008_000123``), COCO ids integers (also
    given as 0-d tensors or numpy integers)."""
    if isinstance(image_id, str):
        return image_id
    if isinstance(image_id, (torch.Tensor, np.ndarray, np.generic)):
        image_id = image_id.item()
    return image_id if isinstance(image_id, str) else int(image_id)


@EVALUATORS.register()
class VOCEvaluator:
    """Per-class VOC AP and mAP (``voc/mAP``, ``voc/AP-<class>``); DDP-aware.

    Ground truth comes from ``coco_gt`` (``dataset.coco_gt()``: original pixels, difficult boxes
    as iscrowd=1) when given; otherwise from the targets, mapped back to original pixels with
    their ``scale``/``offset`` and with ``difficult`` (or ``iscrowd``) boxes ignored.
    Classes without non-difficult GT get AP NaN and are left out of the mean.
    """

    def __init__(self, *, class_names: Sequence[str], metric: str = "voc07", iou_thr: float = 0.5,
                 legacy_coords: bool = False, coco_gt=None, label_to_cat_id: Sequence[int] | None = None,
                 pr_curve_dir: str | None = None):
        if metric not in ("voc07", "voc12"):
            raise ValueError(f"metric must be 'voc07' or 'voc12', got {metric!r}")
        if not 0.0 < float(iou_thr) < 1.0:
            raise ValueError(f"iou_thr must be in (0, 1), got {iou_thr}")
        self.class_names = list(class_names)
        self.metric, self.iou_thr, self.legacy_coords = metric, float(iou_thr), bool(legacy_coords)
        self.coco_gt = load_coco(coco_gt) if coco_gt is not None else None
        if self.coco_gt is not None:
            cat_ids = label_to_cat_id if label_to_cat_id is not None else sorted(self.coco_gt.getCatIds())
            if len(cat_ids) != len(self.class_names):
                raise ValueError(f"{len(cat_ids)} category ids for {len(self.class_names)} class_names")
            self.cat_to_label = {int(c): i for i, c in enumerate(cat_ids)}
        self.pr_curve_dir = pr_curve_dir
        self.last_report = ""
        self.reset()

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, dataset=None) -> "VOCEvaluator":
        kwargs = dict(cfg)
        if dataset is not None:
            kwargs.setdefault("class_names", getattr(dataset, "class_names", None))
            if hasattr(dataset, "coco_gt") and "coco_gt" not in kwargs:
                kwargs["coco_gt"] = dataset_coco_gt(dataset, path)
                kwargs.setdefault("label_to_cat_id", getattr(dataset, "label_to_cat_id", None))
        if kwargs.get("class_names") is None:
            raise ConfigError(f"{path}: VOCEvaluator needs 'class_names' (or a dataset that has them)")
        return construct(cls, kwargs, path, errors=(TypeError, ValueError, FileNotFoundError))

    def reset(self) -> None:
        self._images: dict[int | str, dict] = {}

    def process(self, targets: list[dict], predictions: list[dict]) -> None:
        """Keep detections (and GT from targets when there is no ``coco_gt``) per image."""
        for target, pred in zip(targets, predictions):
            image_id = _image_key(target["image_id"])
            entry = {"det": (pred["boxes"].detach().cpu().double().numpy().reshape(-1, 4),
                             pred["scores"].detach().cpu().double().numpy(),
                             pred["labels"].detach().cpu().numpy())}
            if self.coco_gt is None:
                entry["gt"] = self._gt_from_target(target)
            self._images[image_id] = entry

    @staticmethod
    def _gt_from_target(target: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes = boxes_to_original(target["boxes"].detach().cpu().double(), target)
        n = len(boxes)
        difficult = torch.zeros(n, dtype=torch.bool)
        for key in ("difficult", "iscrowd"):
            if key in target:
                difficult |= target[key].detach().cpu().bool().reshape(-1)
        return boxes.numpy(), target["labels"].detach().cpu().numpy(), difficult.numpy()

    def _gt_from_coco(self, image_id: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self.coco_gt is not None  # only called with coco_gt
        anns = self.coco_gt.imgToAnns.get(image_id, [])
        anns = [a for a in anns if int(a["category_id"]) in self.cat_to_label]
        boxes = np.array([a["bbox"] for a in anns], float).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = np.array([self.cat_to_label[int(a["category_id"])] for a in anns], np.int64)
        difficult = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
        return boxes, labels, difficult

    def evaluate(self) -> dict[str, float]:
        merged = _dist.merge_per_image(_dist.all_gather_object(self._images))
        metrics, self.last_report = _dist.compute_on_rank0(lambda: self._score(merged))
        return metrics

    def _score(self, images: dict[int | str, dict]) -> tuple[dict[str, float], str]:
        metrics: dict[str, float] = {}
        rows, aps = [], []
        gt_per_image = {i: (e["gt"] if self.coco_gt is None else self._gt_from_coco(i))
                        for i, e in images.items()}
        # All images' boxes in flat arrays once; each class is then a mask, not a loop over images.
        index = {key: i for i, key in enumerate(images)}
        det_image, det_boxes, (det_scores, det_labels) = (
            flatten_per_image({k: e["det"] for k, e in images.items()}, index) if images
            else (*_NO_BOXES[:2], [np.zeros(0), np.zeros(0, np.int64)]))
        gt_image, gt_boxes, (gt_labels, gt_difficult) = (
            flatten_per_image(gt_per_image, index) if images
            else (*_NO_BOXES[:2], [np.zeros(0, np.int64), np.zeros(0, bool)]))
        det_scores, gt_difficult = det_scores.astype(np.float64), gt_difficult.astype(bool)
        for label, name in enumerate(self.class_names):
            d, g = det_labels == label, gt_labels == label
            rec, prec, ap, npos = voc_eval_arrays(det_image[d], det_boxes[d], det_scores[d], gt_image[g],
                                                  gt_boxes[g], gt_difficult[g], self.iou_thr, self.metric,
                                                  self.legacy_coords)
            metrics[f"voc/AP-{name}"] = ap
            aps.append(ap)
            rows.append([name, npos, len(rec), ap])
            if self.pr_curve_dir is not None and npos > 0:
                save_pr_curve({f"IoU={self.iou_thr:.2f}": (rec, prec)}, f"VOC {name}",
                              Path(self.pr_curve_dir) / f"voc_pr_{safe_filename(name)}.png")
        valid = [a for a in aps if not np.isnan(a)]
        metrics = {"voc/mAP": float(np.mean(valid)) if valid else float("nan"), **metrics}
        report = (f"VOC {self.metric} evaluation, IoU > {self.iou_thr}, {len(images)} images\n"
                  + format_table(rows + [["mAP", "", "", metrics["voc/mAP"]]],
                                 ["class", "gts", "dets", "AP"]))
        return metrics, report

    def report(self) -> str:
        return self.last_report
