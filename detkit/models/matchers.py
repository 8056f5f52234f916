"""Assign ground-truth boxes to anchors / proposals by IoU, with crowd (ignore) regions.

Legend: M ground-truth boxes, N anchors or proposals, G ignore regions (crowd / difficult).
Boxes are xyxy absolute pixels.

``match_boxes`` returns, per anchor, the index of its ground-truth box or a negative code:

* ``NEGATIVE`` (-1): best IoU below ``low_threshold``: a background sample;
* ``IGNORE`` (-2): best IoU in ``[low_threshold, high_threshold)``, or a would-be negative that
  lies inside a crowd region: trained on as neither foreground nor background.

Crowd regions (COCO ``iscrowd``, VOC ``difficult``) are never matched as positives. An anchor
whose *intersection over its own area* (IoA) with a crowd region exceeds ``crowd_ioa_threshold``
(default 0.5: more than half of the anchor lies inside the crowd) is ignored instead of being a
negative, since it probably shows an object of the crowd. IoA rather than IoU because a crowd
region is usually much larger than the anchors it covers. Anchors that are positives for a
regular box stay positives. ``split_ignored`` separates a target's crowd / difficult boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

__all__ = ["Matcher", "match_boxes", "box_ioa", "ignore_flags", "split_ignored", "NEGATIVE", "IGNORE"]

NEGATIVE = -1
IGNORE = -2


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of ``boxes``: Float[N,4] x Float[G,4] -> Float[N,G] in [0, 1]."""
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    return inter / box_area(boxes).clamp(min=1e-6)[:, None]


class Matcher:
    """Max-IoU matching with two thresholds (Faster R-CNN, section 3.1.2).

    Args:
        high_threshold: IoU >= this makes a positive.
        low_threshold: IoU < this makes a negative; in between is ignored.
        allow_low_quality_matches: additionally match each ground-truth box to the anchors of
            highest IoU with it (ties included), even below ``high_threshold``, so that every
            box gets at least one positive (used by the RPN, not by the RoI head).
    """

    def __init__(self, high_threshold: float, low_threshold: float,
                 allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"Matcher: low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, quality: Tensor) -> Tensor:
        """Float[M,N] IoU (M >= 1) -> Int64[N] matched gt index or NEGATIVE / IGNORE."""
        best_vals, matches = quality.max(dim=0)
        best_any = matches.clone()
        matches[best_vals < self.low_threshold] = NEGATIVE
        between = (best_vals >= self.low_threshold) & (best_vals < self.high_threshold)
        matches[between] = IGNORE
        if self.allow_low_quality_matches:
            best_per_gt = quality.max(dim=1, keepdim=True).values
            anchors_of_best = torch.where(quality == best_per_gt)[1]
            matches[anchors_of_best] = best_any[anchors_of_best]
        return matches


def match_boxes(matcher: Matcher, gt_boxes: Tensor, boxes: Tensor, ignore_regions: Tensor | None = None,
                crowd_ioa_threshold: float = 0.5) -> Tensor:
    """Match Float[N,4] ``boxes`` to Float[M,4] ``gt_boxes`` (M may be 0) -> Int64[N].

    ``ignore_regions`` Float[G,4] are crowd / difficult boxes (see the module docstring).
    """
    num = boxes.shape[0]
    if gt_boxes.shape[0] == 0:
        matches = torch.full((num,), NEGATIVE, dtype=torch.int64, device=boxes.device)
    else:
        matches = matcher(box_iou(gt_boxes, boxes))
    if ignore_regions is not None and ignore_regions.shape[0] > 0 and num > 0:
        in_crowd = box_ioa(boxes, ignore_regions).max(dim=1).values > crowd_ioa_threshold
        matches[in_crowd & (matches == NEGATIVE)] = IGNORE
    return matches


def ignore_flags(target: dict) -> Tensor:
    """Bool[N]: which of a target's boxes are ``iscrowd`` or ``difficult`` (ignore regions)."""
    boxes = target["boxes"]
    ignore = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for key in ("iscrowd", "difficult"):
        if target.get(key) is not None:
            ignore |= torch.as_tensor(target[key], device=boxes.device).bool().reshape(-1)
    return ignore


def split_ignored(target: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(Float[M,4] boxes, Int64[M] labels, Float[G,4] ignore regions) of a target dict.

    Boxes flagged ``iscrowd`` or ``difficult`` become ignore regions (never positives).
    """
    boxes = target["boxes"]
    labels = target.get("labels")
    if labels is None:
        labels = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    ignore = ignore_flags(target)
    keep = ~ignore
    return boxes[keep], labels[keep], boxes[ignore]
