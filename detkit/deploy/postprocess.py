"""Batched decoding of each head's raw outputs into padded detections (the exported graph's tail).

Legend: B images, C classes, N candidates per image, K output rows per image, L levels;
``sizes`` Int64[B,2] is each image's unpadded (H, W) (see ``detkit.deploy.ops.unpadded_sizes``).

Each ``*_candidates`` function turns one head's raw outputs into per-image candidates with the
head's own decoding code (``decode_boxes`` / ``make_priors`` of YOLOv3, ``decode_heatmap`` of
CenterNet, ``yolov1_decode_boxes``, the RPN / RoI heads' ``BoxCoder``) and the head's own
settings (thresholds, top-k, NMS IoU), so the exported graph and ``head.predict`` agree; only
the per-image Python loops of ``predict`` become batched tensor operations here. Boxes are clipped
to each image's unpadded size, and CenterNet's peaks in the padding are dropped, as ``predict``
does with the ``image_sizes`` of the padded batch.
:func:`finalize` applies class-wise NMS and keeps the best ``K`` per image:
``boxes`` Float[B,K,4], ``scores`` Float[B,K], ``labels`` Int64[B,K] (padding: 0, 0, -1),
``num_detections`` Int64[B].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.heads.yolov1_head import yolov1_decode_boxes
from ..models.yolo_targets import decode_boxes, make_priors
from .ops import INVALID_SCORE, clip_boxes, dynamic_min, gather_padded, grouped_nms, top_per_image

__all__ = ["Candidates", "finalize", "pack", "OUTPUT_NAMES", "yolo_candidates", "yolov1_candidates",
           "centernet_candidates", "centernet_decode", "one_stage_candidates", "batched_topk"]

OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")


class Candidates(NamedTuple):
    """Per image candidates: boxes Float[B,N,4] (clipped), scores Float[B,N], labels Int64[B,N],
    valid Bool[B,N]; ``nms_iou`` None = no NMS; ``max_dets`` = K."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    valid: Tensor
    nms_iou: float | None
    max_dets: int


def batched_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``min(k, N)`` of Float[B,N] along N (values, indices), with N possibly dynamic."""
    return scores.topk(dynamic_min(k, scores.shape[1]), dim=1)  # type: ignore[arg-type]


def _gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """values [B,N,...] at Int64[B,K] -> [B,K,...]."""
    batch = torch.arange(values.shape[0], device=values.device)[:, None]
    return values[batch, index]


def pack(row: Tensor, cand: Tensor, c: Candidates, num_images, n, image: Tensor | None = None
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kept candidates (row Int64[M] of ``c``'s arrays, index Int64[M] into its N columns; the
    row is the image unless ``image`` Int64[M] says otherwise) -> the padded four outputs."""
    flat = row * n + cand
    image = row if image is None else image
    scores = c.scores.reshape(-1)[flat]
    index, valid = top_per_image(image, scores, num_images, c.max_dets)
    boxes = gather_padded(c.boxes.reshape(-1, 4)[flat], index)
    labels = gather_padded(c.labels.reshape(-1)[flat], index, fill=-1)
    return boxes, gather_padded(scores, index), labels, valid.sum(dim=1)


def finalize(c: Candidates, num_classes: int, num_images) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-wise NMS (when ``c.nms_iou`` is set: one NMS group per image, one score column per
    class, holding the candidates of that class), then the ``K`` best per image, padded."""
    n = c.scores.shape[1]
    if c.nms_iou is None:
        image, cand = torch.nonzero(c.valid, as_tuple=True)
        return pack(image, cand, c, num_images, n)
    classes = torch.arange(num_classes, device=c.labels.device)[None, :, None]
    columns = c.valid[:, None, :] & (c.labels[:, None, :] == classes)              # [B,C,N]
    scores = torch.where(columns, c.scores[:, None, :], torch.full_like(c.scores[:, None, :], INVALID_SCORE))
    kept = grouped_nms(c.boxes, scores, c.nms_iou)
    return pack(kept[:, 0], kept[:, 2], c, num_images, n)


# ------------------------------------------------------------------------------ one-stage heads
def yolo_candidates(head: Any, outputs: list[Tensor], sizes: Tensor) -> Candidates:
    """YOLOHead: score = sigmoid(obj) * sigmoid(cls) per (prediction, class) pair; the
    ``pre_nms_topk`` best pairs above ``score_thr`` (what ``YOLOHead.predict`` keeps)."""
    raw = head.flatten(outputs)                                                    # [B,P,5+C]
    priors = make_priors([(o.shape[2], o.shape[3]) for o in outputs], head.strides, head.anchors)
    pair_scores = (raw[..., 4:5].sigmoid() * raw[..., 5:].sigmoid()).flatten(1)   # [B,P*C]
    scores, index = batched_topk(pair_scores, head.pre_nms_topk)
    pred, labels = index // head.num_classes, index % head.num_classes
    chosen = _gather_rows(raw, pred)
    boxes = decode_boxes(chosen[..., :2].sigmoid(), chosen[..., 2:4], priors.cells[pred],
                         priors.strides[pred], priors.anchor_wh[pred])
    return Candidates(clip_boxes(boxes, sizes), scores, labels, scores > head.score_thr,
                      head.nms_thr, head.max_dets)


def yolov1_candidates(head: Any, outputs: dict[str, Tensor], sizes: Tensor) -> Candidates:
    """YOLOv1Head: class-specific confidence p(c) * conf for every (box predictor, cell, class)."""
    boxes = yolov1_decode_boxes(outputs["box"], head.stride)                       # [B,P,S,S,4]
    batch, c = boxes.shape[0], head.num_classes
    scores = outputs["conf"][:, :, None] * outputs["cls_prob"][:, None]          # [B,P,C,S,S]
    scores = scores.permute(0, 1, 3, 4, 2).reshape(batch, -1)                     # [B,P*S*S*C]
    boxes = boxes.reshape(batch, -1, 1, 4).expand(-1, -1, c, -1).reshape(batch, -1, 4)
    labels = torch.arange(c, device=scores.device).repeat(boxes.shape[1] // c)[None].expand_as(scores)
    return Candidates(clip_boxes(boxes, sizes), scores, labels, scores > head.score_thr,
                      head.nms_thr, head.max_detections)


def centernet_decode(heat: Tensor, wh: Tensor, offset: Tensor, stride: int, k: int, sizes: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``decode_heatmap(..., valid_sizes=ceil(sizes / stride))`` in exportable form: 3x3 max-pool
    peaks, peaks in the padding dropped, top ``min(k, C*H*W)`` with the minimum taken in the graph
    (a trace-time ``min`` would fix it for the export size: TopK fails on smaller inputs).

    heat Float[B,C,H,W] probabilities, wh / offset Float[B,2,H,W] -> scores Float[B,K],
    labels Int64[B,K], boxes Float[B,K,4] xyxy input pixels.
    """
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    height, width = heat.shape[2], heat.shape[3]
    cells = torch.div(sizes + (stride - 1), stride, rounding_mode="floor")          # [B,2]
    rows = torch.arange(height, device=heat.device)[None, :, None] < cells[:, :1, None]
    cols = torch.arange(width, device=heat.device)[None, None, :] < cells[:, 1:, None]
    heat = heat * (rows & cols)[:, None].to(heat.dtype)
    scores, flat = batched_topk(heat.flatten(1), k)
    labels = torch.div(flat, height * width, rounding_mode="floor")
    cell = flat - labels * (height * width)
    ys = torch.div(cell, width, rounding_mode="floor")
    xs = cell - ys * width
    index = cell[:, None].expand(-1, 2, -1)
    size, off = wh.flatten(2).gather(2, index), offset.flatten(2).gather(2, index)  # [B,2,K]
    cx, cy = xs.to(heat.dtype) + off[:, 0], ys.to(heat.dtype) + off[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1) * stride
    return scores, labels, boxes


def centernet_candidates(head: Any, outputs: dict[str, Tensor], sizes: Tensor) -> Candidates:
    """CenterNetHead: max-pool peaks inside each image and top-K over classes and cells."""
    scores, labels, boxes = centernet_decode(torch.sigmoid(outputs["heatmap"].float()),
                                             outputs["wh"].float(), outputs["offset"].float(),
                                             head.stride, head.topk, sizes)
    return Candidates(clip_boxes(boxes, sizes), scores, labels, scores > head.score_thresh,
                      head.nms_iou_thresh, head.topk)


def one_stage_candidates(head: Any, outputs, sizes: Tensor) -> Candidates:
    """Dispatch on the head type; a head without an exportable decoder is a clear error."""
    from ..models.heads.centernet_head import CenterNetHead
    from ..models.heads.yolo_head import YOLOHead
    from ..models.heads.yolov1_head import YOLOv1Head

    for cls, fn in ((YOLOHead, yolo_candidates), (YOLOv1Head, yolov1_candidates),
                    (CenterNetHead, centernet_candidates)):
        if isinstance(head, cls):
            return fn(head, outputs, sizes)
    raise TypeError(f"{type(head).__name__}: no exportable decoder (detkit.deploy.postprocess "
                    f"knows YOLOHead, YOLOv1Head and CenterNetHead)")


def detr_outputs(logits: Tensor, boxes: Tensor, padded_hw: Tensor, sizes: Tensor, num_top: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NMS-free DETR decoding as ``detkit.models.detr.outputs.topk_predictions``, batched:
    logits Float[B,Q,C], boxes Float[B,Q,4] cxcywh normalised to the padded input (``padded_hw``
    Int64[2]) -> the four outputs with K = min(num_top, Q*C) rows per image (all of them valid),
    boxes xyxy pixels clipped at each image's unpadded size (``sizes`` Int64[B,2])."""
    from ..models.detr.position import cxcywh_to_xyxy

    num_classes = logits.shape[-1]
    k = min(int(num_top), int(logits.shape[1]) * int(num_classes))   # Q and C are fixed in a graph
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    picked = boxes.gather(1, query[..., None].expand(-1, -1, 4))
    hw = padded_hw.to(boxes.dtype)
    xyxy = cxcywh_to_xyxy(picked) * torch.stack([hw[1], hw[0], hw[1], hw[0]])
    count = torch.zeros_like(index[:, 0]) + k
    return clip_boxes(xyxy, sizes), scores, index % num_classes, count
