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

``HungarianMatcher`` is the DETR families' one-to-one set matching (cxcywh normalised boxes).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_area, box_convert, box_iou, generalized_box_iou

__all__ = ["Matcher", "HungarianMatcher", "match_boxes", "box_ioa", "ignore_flags", "split_ignored",
           "NEGATIVE", "IGNORE"]

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


class HungarianMatcher:
    """One-to-one matching of a DETR's predictions to the ground truth (DETR, section 3.1;
    RT-DETR's costs), solved per image by ``scipy.optimize.linear_sum_assignment``.

    Legend: Q predictions (queries), N targets of an image, C classes. Boxes are cxcywh,
    normalised to the padded input. The cost of pairing prediction q with target n is
    ``class_weight * class_cost + bbox_weight * L1(box_q, box_n) - giou_weight * GIoU(box_q, box_n)``.
    With ``use_focal`` the class cost is the focal loss of the positive label minus that of the
    negative (``alpha``, ``gamma``; sigmoid scores), else ``-softmax(logits)[label]``.

    Args:
        class_weight / bbox_weight / giou_weight: the cost weights (RT-DETR / D-FINE: 2, 5, 2).
        use_focal: focal (sigmoid) class cost, else the softmax probability.
        alpha / gamma: the focal cost's parameters (0.25, 2.0).
    """

    def __init__(self, *, class_weight: float = 2.0, bbox_weight: float = 5.0, giou_weight: float = 2.0,
                 use_focal: bool = True, alpha: float = 0.25, gamma: float = 2.0):
        if class_weight == bbox_weight == giou_weight == 0:
            raise ValueError("HungarianMatcher: class_weight, bbox_weight and giou_weight are all 0")
        self.class_weight = float(class_weight)
        self.bbox_weight = float(bbox_weight)
        self.giou_weight = float(giou_weight)
        self.use_focal = bool(use_focal)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """logits Float[Q,C], boxes Float[Q,4], labels Int64[N], target_boxes Float[N,4] -> Float[Q,N]."""
        logits, boxes, target_boxes = logits.float(), boxes.float(), target_boxes.float()
        if self.use_focal:
            prob = logits.sigmoid()[:, labels]
            positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
            negative = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
            class_cost = positive - negative
        else:
            class_cost = -logits.softmax(-1)[:, labels]
        l1_cost = torch.cdist(boxes, target_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                   box_convert(target_boxes, "cxcywh", "xyxy"))
        return self.class_weight * class_cost + self.bbox_weight * l1_cost - self.giou_weight * giou

    @torch.no_grad()
    def __call__(self, pred_logits: Tensor, pred_boxes: Tensor,
                 targets: Sequence[dict]) -> list[tuple[Tensor, Tensor]]:
        """pred_logits Float[B,Q,C], pred_boxes Float[B,Q,4], targets ``[{labels Int64[N],
        boxes Float[N,4]}] * B`` -> per image (pred_idx, tgt_idx), both Int64[min(Q, N)] on the
        predictions' device, pred_idx ascending. An image without targets gets two empty tensors.
        A NaN / inf cost (a diverged prediction) is replaced by the largest float, so that such a
        prediction is only matched when nothing else can be."""
        # imported here: scipy.optimize would add 0.3 s to every detkit import
        from scipy.optimize import linear_sum_assignment

        device = pred_logits.device
        matches = []
        for logits, boxes, target in zip(pred_logits, pred_boxes, targets):
            if target["boxes"].shape[0] == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, boxes, target["labels"], target["boxes"])
            big = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64, device=device),
                            torch.as_tensor(cols, dtype=torch.int64, device=device)))
        return matches
