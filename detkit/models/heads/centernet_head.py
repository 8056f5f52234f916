"""CenterNetHead: objects as points (Zhou, Wang, Kraehenbuehl 2019), the box ("ctdet") task.

Legend: B images, C classes, H x W output map (stride s, normally 4), M objects, K kept peaks.
Outputs of ``forward``: ``heatmap`` Float[B,C,H,W] logits (sigmoid = centre probability),
``wh`` Float[B,2,H,W] box width/height in cells, ``offset`` Float[B,2,H,W] sub-cell centre offset.

Loss (per batch): penalty-reduced pixel-wise focal loss (alpha 2, beta 4) over all cells, divided
by the number of peak cells, i.e. heatmap cells whose target is 1 (by 1 when there are none, so
an empty image contributes its negative term). That is the reference code's normaliser: the
positive term sums over peak cells, and two same-class objects centred in one cell share one
peak, so dividing by the M objects would under-weight such images. ``focal_normalizer:
objects`` divides by M instead (detkit's earlier form, kept to reproduce results trained with
it). L1 on ``wh`` (weight 0.1) and ``offset`` (weight 1) at the M integer centres, averaged over
the 2M regressed numbers (zero when M = 0). In DDP each rank normalises by its own count, as the
paper's code does. Targets are built by :mod:`detkit.models.centernet_targets`.

Predict: sigmoid, 3x3 max-pool peak extraction, top-K (100) over all classes and cells,
``box = ((x + dx) -/+ w/2, (y + dy) -/+ h/2) * s`` clipped to the image. No NMS is needed; an
optional class-wise NMS (``nms_iou_thresh``) is applied after top-K when set. Flip testing
averages the heatmap (as probabilities) and ``wh`` of an image and its mirror, keeping the
un-flipped ``offset`` (a mirrored sub-cell offset does not map to the same cell);
switched on by ``flip_test: true`` on ``OneStageDetector`` (see ``merge_flip``).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from ...registry import HEADS
from ...structures import ShapeSpec
from ..centernet_targets import RADIUS_FORMULAS, RADIUS_SIZES, decode_heatmap, render_targets

__all__ = ["CenterNetHead", "penalty_reduced_focal_loss", "FOCAL_NORMALIZERS"]

FOCAL_NORMALIZERS = ("peaks", "objects")

PROB_EPS = 1e-4  # sigmoid clamp: log(p) and log(1-p) stay >= log(1e-4) = -9.2


def penalty_reduced_focal_loss(logits: Tensor, target: Tensor, ignore: Tensor | None = None,
                               alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Sum over cells of CornerNet's focal loss (normalise it yourself).

    ``-(1-p)^alpha log p`` where ``target == 1``, else ``-(1-target)^beta p^alpha log(1-p)``;
    cells in ``ignore`` (Bool, same shape) contribute no negative term. ``p`` is the sigmoid of
    ``logits`` clamped to [1e-4, 1-1e-4] (computed in float32, also under autocast).
    """
    prob = torch.sigmoid(logits.float()).clamp(PROB_EPS, 1 - PROB_EPS)
    target = target.float()
    pos = target.eq(1)
    pos_loss = (1 - prob).pow(alpha) * prob.log() * pos
    neg_weight = (1 - target).pow(beta) * ~pos
    if ignore is not None:
        neg_weight = neg_weight * ~ignore
    neg_loss = prob.pow(alpha) * (1 - prob).log() * neg_weight
    return -(pos_loss.sum() + neg_loss.sum())


def _branch(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    if hidden <= 0:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1))
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out_channels, 1))


@HEADS.register()
class CenterNetHead(nn.Module):
    """Heatmap + size + offset branches (3x3 conv -> ReLU -> 1x1 conv each) on one stride-s map.

    Args:
        input_shapes: feature shapes from the neck; ``in_feature`` is used (stride s).
        num_classes: C.
        in_feature: the map to predict on (``p2`` from ``CenterNetUpsample``).
        head_channels: hidden channels of each branch (64; 0 = a single 1x1 conv).
        heatmap_bias: initial bias of the heatmap logits (-2.19, i.e. prior probability 0.1).
        min_overlap, radius_formula: gaussian radius (see ``centernet_targets.gaussian_radius``:
            ``cornernet`` = the released CornerNet/CenterNet expression, ``corrected`` = true roots).
        radius_sizes: ``ceil`` (the reference: radius of ``ceil(h), ceil(w)`` cells) or ``float``.
        focal_normalizer: ``peaks`` (the reference: number of peak cells) or ``objects``.
        ignore_crowd_regions: crowd/difficult boxes are never positives; when True their cells
            (of their class) are also left out of the negative focal term.
        focal_alpha, focal_beta: focal loss exponents (2, 4).
        heatmap_weight, wh_weight, offset_weight: loss weights (1, 0.1, 1).
        topk: peaks kept per image (100); score_thresh: drop peaks scoring at most this.
        nms_iou_thresh: None (default, as the paper) or an IoU for class-wise NMS after top-K.
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 in_feature: str = "p2", head_channels: int = 64, heatmap_bias: float = -2.19,
                 min_overlap: float = 0.7, radius_formula: str = "cornernet",
                 radius_sizes: str = "ceil", focal_normalizer: str = "peaks",
                 ignore_crowd_regions: bool = True, focal_alpha: float = 2.0,
                 focal_beta: float = 4.0, heatmap_weight: float = 1.0, wh_weight: float = 0.1,
                 offset_weight: float = 1.0, topk: int = 100, score_thresh: float = 0.0,
                 nms_iou_thresh: float | None = None):
        super().__init__()
        if in_feature not in input_shapes:
            raise ValueError(f"CenterNetHead: in_feature '{in_feature}' not among the input "
                             f"features ({', '.join(input_shapes)})")
        if radius_formula not in RADIUS_FORMULAS:
            raise ValueError(f"CenterNetHead: radius_formula '{radius_formula}' is not one of "
                             f"{RADIUS_FORMULAS}")
        for name, value, allowed in (("radius_sizes", radius_sizes, RADIUS_SIZES),
                                     ("focal_normalizer", focal_normalizer, FOCAL_NORMALIZERS)):
            if value not in allowed:
                raise ValueError(f"CenterNetHead: {name} '{value}' is not one of {allowed}")
        if num_classes < 1 or topk < 1:
            raise ValueError(f"CenterNetHead: num_classes ({num_classes}) and topk ({topk}) must be >= 1")
        spec = input_shapes[in_feature]
        self.in_feature, self.stride, self.num_classes = in_feature, int(spec.stride), int(num_classes)
        self.min_overlap, self.radius_formula = float(min_overlap), radius_formula
        self.radius_sizes, self.focal_normalizer = radius_sizes, focal_normalizer
        self.ignore_crowd_regions = bool(ignore_crowd_regions)
        self.focal_alpha, self.focal_beta = float(focal_alpha), float(focal_beta)
        self.weights = {"heatmap": float(heatmap_weight), "wh": float(wh_weight),
                        "offset": float(offset_weight)}
        self.topk, self.score_thresh, self.nms_iou_thresh = int(topk), float(score_thresh), nms_iou_thresh
        self.heatmap = _branch(spec.channels, head_channels, num_classes)
        self.wh = _branch(spec.channels, head_channels, 2)
        self.offset = _branch(spec.channels, head_channels, 2)
        self._init_weights(heatmap_bias)

    def _init_weights(self, heatmap_bias: float) -> None:
        nn.init.constant_(cast(Tensor, self.heatmap[-1].bias), heatmap_bias)
        for branch in (self.wh, self.offset):  # small regressions at start, as the paper's code
            for m in branch.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.001)
                    nn.init.zeros_(cast(Tensor, m.bias))

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        x = features[self.in_feature]
        return {"heatmap": self.heatmap(x), "wh": self.wh(x), "offset": self.offset(x)}

    def loss(self, outputs: dict[str, Tensor], targets: list[dict],
             image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        """``loss_heatmap``, ``loss_wh``, ``loss_offset`` (weighted) for one batch."""
        heat = outputs["heatmap"]
        t = render_targets(targets, image_sizes, (heat.shape[-2], heat.shape[-1]), self.num_classes,
                           self.stride, min_overlap=self.min_overlap, formula=self.radius_formula,
                           ignore_crowd_regions=self.ignore_crowd_regions, radius_sizes=self.radius_sizes)
        focal = penalty_reduced_focal_loss(heat, t.heatmap, t.ignore if self.ignore_crowd_regions
                                           else None, self.focal_alpha, self.focal_beta)
        count = t.num_peaks if self.focal_normalizer == "peaks" else t.num_objects
        losses = {"loss_heatmap": self.weights["heatmap"] * focal / max(count, 1)}
        for name, target in (("wh", t.wh), ("offset", t.offset)):
            pred = outputs[name].float().permute(0, 2, 3, 1).reshape(-1, 2)[t.indices]
            l1 = F.l1_loss(pred, target, reduction="sum") / max(target.numel(), 1)
            losses[f"loss_{name}"] = self.weights[name] * l1
        return losses

    @torch.no_grad()
    def predict(self, outputs: dict[str, Tensor], image_sizes: list[tuple[int, int]]) -> list[dict]:
        """Per image ``boxes`` Float[K,4] xyxy (pixels of the unpadded input), ``scores``, ``labels``."""
        heat = torch.sigmoid(outputs["heatmap"].float())
        cells = [(math.ceil(h / self.stride), math.ceil(w / self.stride)) for h, w in image_sizes]
        scores, labels, boxes = decode_heatmap(heat, outputs["wh"].float(), outputs["offset"].float(),
                                               self.stride, self.topk, valid_sizes=cells)
        results = []
        for s, lab, b, size in zip(scores, labels, boxes, image_sizes):
            keep = s > self.score_thresh
            s, lab, b = s[keep], lab[keep], clip_boxes_to_image(b[keep], size)
            if self.nms_iou_thresh is not None:
                keep = batched_nms(b, s, lab, float(self.nms_iou_thresh))
                s, lab, b = s[keep], lab[keep], b[keep]
            results.append({"boxes": b, "scores": s, "labels": lab})
        return results

    @staticmethod
    def merge_flip(outputs: dict[str, Tensor], flipped: dict[str, Tensor]) -> dict[str, Tensor]:
        """Merge the outputs of images and of their horizontal mirrors (same padded width)."""
        prob = (torch.sigmoid(outputs["heatmap"].float())
                + torch.sigmoid(flipped["heatmap"].float()).flip(-1)) / 2
        return {"heatmap": torch.logit(prob, eps=1e-6),
                "wh": (outputs["wh"] + flipped["wh"].flip(-1)) / 2,
                "offset": outputs["offset"]}
