"""YOLOv3 grid maths: prediction priors, anchor assignment, box encode/decode, ignore masks.

Pure functions used by :class:`detkit.models.heads.yolo_head.YOLOHead` (kept apart so the loss and
the tests can use them without building a network).

Legend: L levels, A anchors per level, Hl x Wl the grid of level l, P = sum_l A*Hl*Wl predictions
of one image, ordered (level, anchor, row, column); N ground-truth boxes, M positive
(prediction, box) pairs, C classes. Boxes are ``xyxy`` in absolute input-image pixels; anchors are
(w, h) in input pixels.

Parameterisation (YOLOv3 paper): for the prediction in cell (cx, cy) of a level with stride s and
anchor (aw, ah)::

    bx = (sigmoid(tx) + cx) * s        bw = aw * exp(tw)
    by = (sigmoid(ty) + cy) * s        bh = ah * exp(th)

so the training target of a box is ``offset = centre / s - cell`` in [0, 1] (BCE target of
sigmoid(tx)) and ``log(w / aw)`` (regression target of tw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

__all__ = ["YOLOPriors", "Assignment", "make_priors", "decode_boxes", "encode_boxes",
           "shape_iou", "assign_anchors", "box_ioa", "ignore_mask"]

# exp(tw) above e^8 (~3000x the anchor) is never a real box; clamping keeps untrained or
# diverging outputs from overflowing to inf in float16/float32.
MAX_LOG_WH = 8.0


@dataclass
class YOLOPriors:
    """Per-prediction constants of one grid layout (shared by every image of a batch).

    ``cells`` Float[P,2] (cx, cy) cell indices, ``strides`` Float[P], ``anchor_wh`` Float[P,2];
    ``anchors`` Float[L,A,2]; per level: ``sizes`` (Hl, Wl), ``strides_per_level`` s_l, and
    ``offsets`` (index of the level's first prediction in the flat P ordering).
    """

    cells: Tensor
    strides: Tensor
    anchor_wh: Tensor
    anchors: Tensor
    sizes: list[tuple[int, int]]
    strides_per_level: list[int]
    offsets: list[int]

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[1])


def make_priors(sizes: Sequence[tuple[int, int]], strides: Sequence[int], anchors: Tensor) -> YOLOPriors:
    """Build :class:`YOLOPriors` for grids ``sizes`` [(Hl, Wl)], ``strides`` [s_l],
    ``anchors`` Float[L,A,2]."""
    device, dtype = anchors.device, anchors.dtype
    num_anchors = anchors.shape[1]
    cells, stride_list, anchor_list, offsets = [], [], [], []
    total = 0
    for (h, w), s, level_anchors in zip(sizes, strides, anchors):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                                torch.arange(w, device=device, dtype=dtype), indexing="ij")
        grid = torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).expand(num_anchors, -1, -1)
        cells.append(grid.reshape(-1, 2))
        anchor_list.append(level_anchors[:, None, :].expand(-1, h * w, -1).reshape(-1, 2))
        stride_list.append(torch.full((num_anchors * h * w,), float(s), device=device, dtype=dtype))
        offsets.append(total)
        total += num_anchors * h * w
    return YOLOPriors(cells=torch.cat(cells), strides=torch.cat(stride_list),
                      anchor_wh=torch.cat(anchor_list), anchors=anchors,
                      sizes=[(int(h), int(w)) for h, w in sizes],
                      strides_per_level=[int(s) for s in strides], offsets=offsets)


def decode_boxes(offset_xy: Tensor, log_wh: Tensor, cells: Tensor, strides: Tensor,
                 anchor_wh: Tensor) -> Tensor:
    """Boxes Float[...,4] xyxy from cell offsets Float[...,2] in [0,1] (i.e. after the sigmoid) and
    log sizes Float[...,2] (tw, th), for predictions with ``cells`` [...,2], ``strides`` [...],
    ``anchor_wh`` [...,2] (broadcast against the leading dims)."""
    centre = (offset_xy + cells) * strides[..., None]
    wh = anchor_wh * log_wh.clamp(max=MAX_LOG_WH).exp()
    return box_convert(torch.cat([centre, wh], dim=-1), "cxcywh", "xyxy")


def encode_boxes(boxes: Tensor, cells: Tensor, strides: Tensor, anchor_wh: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`decode_boxes` for boxes Float[M,4] xyxy assigned to the given predictions.

    Returns ``offset_xy`` Float[M,2] clamped to [0, 1] (a centre outside the image, possible after
    random affine, is moved to the border of its clamped cell) and ``log_wh`` Float[M,2].
    """
    cxcywh = box_convert(boxes, "xyxy", "cxcywh")
    offset_xy = (cxcywh[:, :2] / strides[:, None] - cells).clamp(0.0, 1.0)
    log_wh = torch.log(cxcywh[:, 2:].clamp(min=1e-6) / anchor_wh)
    return offset_xy, log_wh


def shape_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU Float[N,K] of boxes Float[N,2] and Float[K,2] given as (w, h), aligned at a common centre."""
    inter = torch.minimum(wh1[:, None, :], wh2[None, :, :]).prod(-1)
    union = wh1.prod(-1)[:, None] + wh2.prod(-1)[None, :] - inter
    return inter / union.clamp(min=1e-9)


@dataclass
class Assignment:
    """Positive pairs: prediction ``pred_index`` Int64[M] (flat over P) learns box ``gt_index`` Int64[M]."""

    pred_index: Tensor
    gt_index: Tensor


def assign_anchors(gt_boxes: Tensor, priors: YOLOPriors, multi_anchor_thr: float | None = None) -> Assignment:
    """Match each box Float[N,4] to the anchor (over all levels) of highest shape IoU, in the cell
    of each level's grid that contains the box centre.

    With ``multi_anchor_thr`` every other anchor whose shape IoU exceeds it is a positive too (in its
    own level's cell). A prediction claimed by several boxes keeps the box of highest shape IoU
    (ties: the lower box index), so each prediction has one target.
    """
    device = gt_boxes.device
    num_levels, num_anchors = priors.anchors.shape[:2]
    if gt_boxes.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Assignment(empty, empty)
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).to(priors.anchors.dtype)
    ious = shape_iou(wh, priors.anchors.reshape(-1, 2))                        # [N, L*A]
    chosen = torch.zeros_like(ious, dtype=torch.bool)
    chosen[torch.arange(len(ious), device=device), ious.argmax(dim=1)] = True
    if multi_anchor_thr is not None:
        chosen |= ious > multi_anchor_thr
    gt_index, anchor_index = chosen.nonzero(as_tuple=True)
    level, anchor = anchor_index // num_anchors, anchor_index % num_anchors

    heights = torch.tensor([h for h, _ in priors.sizes], device=device)[level]
    widths = torch.tensor([w for _, w in priors.sizes], device=device)[level]
    strides = torch.tensor(priors.strides_per_level, device=device, dtype=wh.dtype)[level]
    offsets = torch.tensor(priors.offsets, device=device)[level]
    centre = (gt_boxes[gt_index, :2] + gt_boxes[gt_index, 2:]) / 2
    # Centres on (or beyond) the bottom/right border belong to the last cell, not a missing one.
    col = torch.minimum((centre[:, 0] / strides).floor().long().clamp(min=0), widths - 1)
    row = torch.minimum((centre[:, 1] / strides).floor().long().clamp(min=0), heights - 1)
    pred_index = offsets + (anchor * heights + row) * widths + col

    order = torch.argsort(-ious[gt_index, anchor_index], stable=True)
    pred_index, gt_index = pred_index[order], gt_index[order]
    unique, inverse = torch.unique(pred_index, return_inverse=True)
    first = torch.full((len(unique),), len(pred_index), device=device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(pred_index), device=device), "amin")
    return Assignment(pred_index[first], gt_index[first])


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of ``boxes``: Float[P,K] for boxes Float[P,4], regions Float[K,4]."""
    lt = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)
    return inter / area[:, None].clamp(min=1e-9)


def ignore_mask(pred_boxes: Tensor, gt_boxes: Tensor, crowd_boxes: Tensor, thr: float) -> Tensor:
    """Bool[P]: predictions (decoded, Float[P,4]) that get no objectness loss as negatives.

    A prediction is ignored if its IoU with some ground-truth box Float[N,4] exceeds ``thr``
    (YOLOv3), or if more than ``thr`` of its area lies inside a crowd/difficult region Float[K,4]
    (intersection over the prediction, as COCO matches detections to crowd regions).
    """
    ignored = torch.zeros(len(pred_boxes), dtype=torch.bool, device=pred_boxes.device)
    if len(gt_boxes):
        ignored |= box_iou(pred_boxes, gt_boxes).amax(dim=1) > thr
    if len(crowd_boxes):
        ignored |= box_ioa(pred_boxes, crowd_boxes).amax(dim=1) > thr
    return ignored
