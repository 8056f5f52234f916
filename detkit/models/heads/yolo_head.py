"""YOLOv3 grid head: per level a 1x1 conv to A x (5 + C) outputs, the YOLOv3 loss and decoding.

Legend: B images, L levels, A anchors per level, Hl x Wl grid of level l, P = sum_l A*Hl*Wl
predictions per image, M positives in the batch, C classes. Boxes are ``xyxy`` absolute pixels of
the (letterboxed) network input; outputs per prediction are (tx, ty, tw, th, objectness, C class
logits). Grid maths (priors, assignment, encode/decode) lives in :mod:`detkit.models.yolo_targets`.

Follows "YOLOv3: An Incremental Improvement" (Redmon & Farhadi, 2018):

* assignment: each ground-truth box is a positive for the one anchor, over all levels, with the
  highest shape IoU, in the cell that contains its centre; optional ``multi_anchor_thr`` also
  assigns every anchor with shape IoU above it (the common multi-anchor variant);
* negatives whose decoded box has IoU > ``ignore_thr`` (0.5) with some ground truth get no
  objectness loss;
* losses: BCE on sigmoid(tx, ty) against the in-cell offset, squared error (``box_loss: mse``) or
  L1 (``l1``) on (tw, th) against log(w / anchor_w), both weighted by (2 - w*h) with w, h the box
  size relative to the (unpadded) input image, as darknet does; or ``giou``: 1 - GIoU of the
  decoded box, with the same (2 - w*h) weight; BCE objectness (target 1 for positives, 0 for the
  rest); BCE multi-label classification (independent sigmoids, one-hot target) on positives.

Deviations / choices, documented:

* loss normalisation: every term is a sum over predictions (and coordinates / classes) divided by
  the number of images in the batch (darknet and mmdetection do the same per-image sum);
* crowd (``iscrowd``) and VOC ``difficult`` boxes are never positives, and negatives with more than
  ``ignore_thr`` of their area inside such a region get no objectness loss (the paper does not
  cover crowd annotations);
* when two boxes claim the same prediction, the box with the higher shape IoU wins (darknet lets
  the last written one win, which depends on annotation order);
* the objectness bias starts at logit(``prior_prob``) (0.01), as in RetinaNet, so the ~10k
  negatives do not swamp the first iterations; darknet starts at 0;
* a box centre outside the image (after random affine) is assigned to the nearest border cell
  with its offset target clamped to [0, 1];
* inference: score = sigmoid(obj) * sigmoid(cls) per class; the (prediction, class) pairs above
  ``score_thr`` are capped to the ``pre_nms_topk`` best before per-class NMS
  (``torchvision.ops.batched_nms``), then ``max_dets`` per image; boxes are clipped to the
  unpadded input image. The cap ranks predictions by their best class first (exact, and it keeps
  an untrained model's ~P x C candidates cheap). Letterbox padding and resizing are undone by
  ``Detector.map_to_original`` from the targets' ``scale``/``offset``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image, generalized_box_iou_loss

from ...registry import HEADS
from ...structures import ShapeSpec
from ..yolo_targets import YOLOPriors, assign_anchors, decode_boxes, encode_boxes, ignore_mask, make_priors

__all__ = ["YOLOHead", "COCO_ANCHORS"]

# The YOLOv3 paper's k-means anchors on COCO at 416 px, (w, h), smallest level first.
COCO_ANCHORS = [[[10, 13], [16, 30], [33, 23]],
                [[30, 61], [62, 45], [59, 119]],
                [[116, 90], [156, 198], [373, 326]]]

BOX_LOSSES = ("mse", "l1", "giou")


def _conv_bn_leaky(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1, inplace=True))


@HEADS.register()
class YOLOHead(nn.Module):
    """YOLOv3 detection head over the levels ``in_features`` (p3, p4, p5: strides 8, 16, 32).

    Args:
        input_shapes: channels and stride of every neck output (given by the detector).
        num_classes: C.
        anchors: per level (in ``in_features`` order) a list of A anchors ``[w, h]`` in pixels.
        in_features: names of the feature maps to predict from.
        feat_channels: if set, a 3x3 conv-BN-LeakyReLU with this many channels precedes the 1x1
            prediction conv on each level (darknet's last 3x3 before the output, for necks that
            stop at the 1x1 block); an int or one int per level.
        ignore_thr: see the module docstring.
        multi_anchor_thr: None for the paper's single best anchor per box.
        box_loss: ``mse`` (paper), ``l1`` or ``giou``.
        box_weight / obj_weight / cls_weight: multipliers of the loss terms.
        prior_prob: initial objectness probability.
        score_thr / nms_thr / pre_nms_topk / max_dets: inference settings.
    """

    anchors: Tensor  # buffer Float[L, A, 2]

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 anchors: Sequence[Sequence[Sequence[float]]] = COCO_ANCHORS,
                 in_features: Sequence[str] = ("p3", "p4", "p5"),
                 feat_channels: int | Sequence[int] | None = None,
                 ignore_thr: float = 0.5, multi_anchor_thr: float | None = None,
                 box_loss: str = "mse", box_weight: float = 1.0, obj_weight: float = 1.0,
                 cls_weight: float = 1.0, prior_prob: float = 0.01, score_thr: float = 0.005,
                 nms_thr: float = 0.45, pre_nms_topk: int = 1000, max_dets: int = 100):
        super().__init__()
        self.in_features = list(in_features)
        anchor_tensor = _check_args(input_shapes, num_classes, anchors, self.in_features, box_loss)
        self.register_buffer("anchors", anchor_tensor, persistent=False)            # [L, A, 2]
        self.num_classes = int(num_classes)
        self.num_anchors = int(anchor_tensor.shape[1])
        self.strides = [int(input_shapes[f].stride) for f in self.in_features]
        self.ignore_thr, self.multi_anchor_thr = float(ignore_thr), multi_anchor_thr
        self.box_loss = box_loss
        self.box_weight, self.obj_weight, self.cls_weight = box_weight, obj_weight, cls_weight
        self.score_thr, self.nms_thr = float(score_thr), float(nms_thr)
        self.pre_nms_topk, self.max_dets = int(pre_nms_topk), int(max_dets)

        in_channels = [int(input_shapes[f].channels) for f in self.in_features]
        if feat_channels is None:
            self.bridges = nn.ModuleList(nn.Identity() for _ in in_channels)
        else:
            widths = ([int(feat_channels)] * len(in_channels) if isinstance(feat_channels, int)
                      else [int(c) for c in feat_channels])
            if len(widths) != len(in_channels):
                raise ValueError(f"feat_channels has {len(widths)} entries for {len(in_channels)} levels")
            self.bridges = nn.ModuleList(_conv_bn_leaky(c, w) for c, w in zip(in_channels, widths))
            in_channels = widths
        outputs_per_anchor = 5 + self.num_classes
        self.predictors = nn.ModuleList(nn.Conv2d(c, self.num_anchors * outputs_per_anchor, 1)
                                        for c in in_channels)
        self._init_bias(prior_prob)

    def _init_bias(self, prior_prob: float) -> None:
        for conv in self.predictors:
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None  # built in __init__
            nn.init.normal_(conv.weight, std=0.01)
            bias = conv.bias.detach().view(self.num_anchors, 5 + self.num_classes)
            bias.zero_()
            bias[:, 4] = -math.log((1 - prior_prob) / prior_prob)

    # ------------------------------------------------------------------ forward
    def forward(self, features: dict[str, Tensor]) -> list[Tensor]:
        """Raw outputs: one Float[B, A, Hl, Wl, 5 + C] per level, in ``in_features`` order."""
        outputs = []
        for name, bridge, predictor in zip(self.in_features, self.bridges, self.predictors):
            x = predictor(bridge(features[name]))
            b, _, h, w = x.shape
            outputs.append(x.view(b, self.num_anchors, 5 + self.num_classes, h, w)
                           .permute(0, 1, 3, 4, 2).contiguous())
        return outputs

    def priors(self, outputs: list[Tensor]) -> YOLOPriors:
        sizes = [(int(o.shape[2]), int(o.shape[3])) for o in outputs]
        return make_priors(sizes, self.strides, self.anchors)

    @staticmethod
    def flatten(outputs: list[Tensor]) -> Tensor:
        """Float[B, P, 5 + C] in float32 (so the loss is computed in full precision under AMP)."""
        return torch.cat([o.reshape(o.shape[0], -1, o.shape[-1]) for o in outputs], dim=1).float()

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: list[Tensor], targets: list[dict],
             image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """Weighted ``loss_*`` terms; each is summed over predictions and divided by B."""
        priors = self.priors(outputs)
        raw = self.flatten(outputs)
        num_images = raw.shape[0]
        with torch.no_grad():
            pred_boxes = decode_boxes(raw[..., :2].sigmoid(), raw[..., 2:4], priors.cells,
                                      priors.strides, priors.anchor_wh)             # [B, P, 4]
        obj_target = torch.zeros(raw.shape[:2], device=raw.device)
        obj_mask = torch.ones(raw.shape[:2], dtype=torch.bool, device=raw.device)
        image_parts: list[Tensor] = []
        pred_parts: list[Tensor] = []
        box_parts: list[Tensor] = []
        label_parts: list[Tensor] = []
        for i, target in enumerate(targets):
            gt_boxes, gt_labels, ignore_regions = _split_targets(target, raw.device)
            match = assign_anchors(gt_boxes, priors, self.multi_anchor_thr)
            obj_mask[i] = ~ignore_mask(pred_boxes[i], gt_boxes, ignore_regions, self.ignore_thr)
            obj_mask[i, match.pred_index] = True
            obj_target[i, match.pred_index] = 1.0
            image_parts.append(torch.full_like(match.pred_index, i))
            pred_parts.append(match.pred_index)
            box_parts.append(gt_boxes[match.gt_index])
            label_parts.append(gt_labels[match.gt_index])
        pos_image, pos_pred = torch.cat(image_parts), torch.cat(pred_parts)
        pos_boxes, pos_labels = torch.cat(box_parts), torch.cat(label_parts)
        pos_raw = raw[pos_image, pos_pred]                                          # [M, 5 + C]

        sizes = torch.tensor(image_sizes, dtype=raw.dtype, device=raw.device)[pos_image]  # (H, W)
        rel_area = (pos_boxes[:, 2:] - pos_boxes[:, :2]).prod(-1) / sizes.prod(-1)
        box_scale = 2.0 - rel_area.clamp(max=1.0)
        losses = {k: v * self.box_weight / num_images for k, v in
                  self._box_terms(pos_raw, pos_pred, pos_boxes, box_scale, priors).items()}
        obj = F.binary_cross_entropy_with_logits(raw[..., 4], obj_target, reduction="none")
        losses["loss_obj"] = self.obj_weight * obj[obj_mask].sum() / num_images
        cls_target = F.one_hot(pos_labels, self.num_classes).to(raw.dtype)
        cls = F.binary_cross_entropy_with_logits(pos_raw[:, 5:], cls_target, reduction="sum")
        losses["loss_cls"] = self.cls_weight * cls / num_images
        return losses

    def _box_terms(self, pos_raw: Tensor, pos_pred: Tensor, pos_boxes: Tensor, box_scale: Tensor,
                   priors: YOLOPriors) -> dict[str, Tensor]:
        """Un-normalised box loss sums over the M positives (Float[M, 5+C] raw, Float[M,4] boxes)."""
        cells, strides = priors.cells[pos_pred], priors.strides[pos_pred]
        anchor_wh = priors.anchor_wh[pos_pred]
        if self.box_loss == "giou":
            boxes = decode_boxes(pos_raw[:, :2].sigmoid(), pos_raw[:, 2:4], cells, strides, anchor_wh)
            giou = generalized_box_iou_loss(boxes, pos_boxes, reduction="none")
            return {"loss_giou": (giou * box_scale).sum()}
        offset_xy, log_wh = encode_boxes(pos_boxes, cells, strides, anchor_wh)
        xy = F.binary_cross_entropy_with_logits(pos_raw[:, :2], offset_xy, reduction="none")
        diff = pos_raw[:, 2:4] - log_wh
        wh = diff.square() if self.box_loss == "mse" else diff.abs()
        return {"loss_xy": (xy.sum(-1) * box_scale).sum(), "loss_wh": (wh.sum(-1) * box_scale).sum()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, outputs: list[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """Per image ``boxes`` Float[K,4] xyxy (input pixels), ``scores`` Float[K], ``labels`` Int64[K]."""
        priors = self.priors(outputs)
        raw = self.flatten(outputs)
        return [self._predict_image(raw[i], priors, (image_sizes[i][0], image_sizes[i][1]))
                for i in range(len(raw))]

    def _predict_image(self, raw: Tensor, priors: YOLOPriors, image_size: tuple[int, int]) -> dict:
        # The k best (prediction, class) pairs all come from the k predictions with the best
        # max-over-classes score, so ranking P predictions first is exact and avoids scoring
        # all P x C pairs of an untrained model.
        obj = raw[:, 4].sigmoid()
        best = obj * raw[:, 5:].amax(dim=1).sigmoid()
        keep = (best > self.score_thr).nonzero().squeeze(1)
        if len(keep) > self.pre_nms_topk:
            keep = keep[best[keep].topk(self.pre_nms_topk).indices]
        scores = (obj[keep, None] * raw[keep, 5:].sigmoid()).flatten()
        candidates = (scores > self.score_thr).nonzero().squeeze(1)
        if len(candidates) > self.pre_nms_topk:
            candidates = candidates[scores[candidates].topk(self.pre_nms_topk).indices]
        scores = scores[candidates]
        pred = keep[candidates // self.num_classes]
        labels = candidates % self.num_classes
        boxes = decode_boxes(raw[pred, :2].sigmoid(), raw[pred, 2:4], priors.cells[pred],
                             priors.strides[pred], priors.anchor_wh[pred])
        boxes = clip_boxes_to_image(boxes, image_size)
        kept = batched_nms(boxes, scores, labels, self.nms_thr)[: self.max_dets]
        return {"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]}


def _split_targets(target: dict, device) -> tuple[Tensor, Tensor, Tensor]:
    """(trainable boxes Float[N,4], their labels Int64[N], crowd/difficult regions Float[K,4]);
    zero-area boxes are dropped from both."""
    boxes = target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
    labels = target["labels"].to(device=device, dtype=torch.long).reshape(-1)
    excluded = torch.zeros(len(boxes), dtype=torch.bool, device=device)
    for key in ("iscrowd", "difficult"):
        if key in target:
            excluded |= torch.as_tensor(target[key], device=device).reshape(-1).bool()
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[valid & ~excluded], labels[valid & ~excluded], boxes[valid & excluded]


def _check_args(input_shapes: dict, num_classes: int, anchors, in_features: list[str],
                box_loss: str) -> Tensor:
    """Validate constructor arguments; returns the anchors as Float[L, A, 2]."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    missing = [f for f in in_features if f not in input_shapes]
    if missing:
        raise ValueError(f"in_features {missing} not among the neck outputs {sorted(input_shapes)}")
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got '{box_loss}'")
    if len(anchors) != len(in_features):
        raise ValueError(f"anchors has {len(anchors)} levels but in_features has {len(in_features)}")
    counts = {len(level) for level in anchors}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every level needs the same (non-zero) number of anchors, got {anchors}")
    try:
        tensor = torch.tensor(anchors, dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"anchors must be [[[w, h], ...] per level], got {anchors}: {e}") from None
    if tensor.dim() != 3 or tensor.shape[-1] != 2 or (tensor <= 0).any():
        raise ValueError(f"anchors must be positive [w, h] pairs per level, got {anchors}")
    return tensor
