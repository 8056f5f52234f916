"""Mask R-CNN mask branch: RoIAlign -> 4 x (conv3x3 + ReLU) -> deconv 2x2 s2 + ReLU -> 1x1 per class.

Legend: B images, C foreground classes, R RoIs of the batch (positives in training, detections
at test time), K_b detections of image b, ch pooled feature channels, r pooler resolution (14),
M = 2r mask resolution (28), H x W the image the masks are pasted into. Boxes are xyxy pixels.

The layer layout is torchvision's ``MaskRCNNHeads`` + ``MaskRCNNPredictor`` (``convs.i`` =
``mask_head.i.0``, ``deconv`` = ``conv5_mask``, ``logits`` = ``mask_fcn_logits`` without the
background channel), so torchvision weights convert one to one (``detkit.models.convert``).

Usage (also what ``TwoStageDetector`` does)::

    # training, after RoIHead.sample_proposals(proposals, targets) -> rois, samples
    positives = positive_rois(rois, samples, num_classes)                  # detkit.models.mask_targets
    logits = mask_head(features, [p["boxes"] for p in positives], image_sizes)   # Float[R,C,M,M]
    losses = mask_head.loss(logits, positives, targets)                    # {"loss_mask": ...}
    # evaluation, after RoIHead.predict -> detections
    logits = mask_head(features, [d["boxes"] for d in detections], image_sizes)
    detections = mask_head.predict(logits, detections)                     # + "mask_probs" Float[K_b,M,M]
    result = mask_head.paste(detection, (H, W))                            # + "masks" Bool[K_b,H,W]
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import HEADS
from ...structures import ShapeSpec
from ..mask_paste import paste_masks
from ..mask_targets import project_masks
from .roi_head import make_pooler, pooled_features

__all__ = ["MaskRoIHead"]


@HEADS.register()
class MaskRoIHead(nn.Module):
    """Per-RoI instance masks (He et al., Mask R-CNN, 2017; the FPN variant of its Figure 4).

    Args:
        input_shapes / num_classes: feature maps and number of foreground classes.
        in_features: maps to pool from (default: every map of stride <= 32, as ``RoIHead``).
        pooler_resolution / sampling_ratio / canonical_scale / canonical_level: RoIAlign settings
            (``make_pooler``); the masks are ``2 * pooler_resolution`` pixels square.
        num_conv / conv_dim: the 3x3 conv stack before the 2x upsampling deconvolution.
        class_agnostic: one mask per RoI instead of one per class.
        loss_weight: factor of ``loss_mask``.
        mask_threshold: probability above which a pasted pixel belongs to the instance.
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 in_features: Sequence[str] | None = None, pooler_resolution: int = 14,
                 sampling_ratio: int = 2, canonical_scale: int = 224, canonical_level: int = 4,
                 num_conv: int = 4, conv_dim: int = 256, class_agnostic: bool = False,
                 loss_weight: float = 1.0, mask_threshold: float = 0.5):
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_features = pooled_features(input_shapes, in_features)
        self.pooler = make_pooler(self.in_features, [input_shapes[f].stride for f in self.in_features],
                                  pooler_resolution, sampling_ratio, canonical_scale, canonical_level)
        channels = input_shapes[self.in_features[0]].channels
        self.convs = nn.ModuleList(nn.Conv2d(channels if i == 0 else conv_dim, conv_dim, 3, padding=1)
                                   for i in range(num_conv))
        last = conv_dim if num_conv else channels
        self.deconv = nn.ConvTranspose2d(last, conv_dim, 2, stride=2)
        self.logits = nn.Conv2d(conv_dim, 1 if class_agnostic else self.num_classes, 1)
        self.mask_size = 2 * int(pooler_resolution)
        self.loss_weight = float(loss_weight)
        self.mask_threshold = float(mask_threshold)
        for m in (*self.convs, self.deconv):   # He (fan-out) initialisation, as torchvision / Detectron2
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        # The per-class logits start near 0 (N(0, 0.001^2), Detectron2's choice; torchvision uses He
        # init here too): an untrained branch then predicts 0.5 everywhere (loss_mask = ln 2). He init
        # gives |logits| of several units, loss_mask ~3.4 and backbone/FPN gradients ~30x the box
        # losses' in the first steps, which fill AdamW's second-moment estimates and slow the box and
        # RPN learning of the shared layers for hundreds of iterations (shapes: bbox AP50 0.761 vs 0.874).
        nn.init.normal_(self.logits.weight, std=0.001)
        assert self.logits.bias is not None  # nn.Conv2d's default bias=True
        nn.init.zeros_(self.logits.bias)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """Float[R_b,4] boxes per image -> mask logits Float[R,C,M,M] (Float[R,1,M,M] class-agnostic)."""
        x = self.pooler({f: features[f] for f in self.in_features}, boxes, list(image_sizes))
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.logits(F.relu(self.deconv(x)))

    def _of_class(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Float[R,M,M]: each RoI's logits for its class (the only channel when class-agnostic)."""
        if logits.shape[1] == 1:
            return logits[:, 0]
        return logits[torch.arange(labels.shape[0], device=logits.device), labels]

    def loss(self, logits: Tensor, positives: list[dict[str, Tensor]],
             targets: list[dict]) -> dict[str, Tensor]:
        """``loss_mask``: mean per-pixel BCE of the positive RoIs' logits for their ground-truth
        class against ``project_masks`` targets; zero (graph kept) when no RoI is positive.

        ``positives``: ``mask_targets.positive_rois`` output, whose boxes ``logits`` were
        computed for; ``targets`` carry ``masks`` Bool/UInt8[G,H,W] aligned with ``boxes``.
        """
        gt_masks = [_instance_masks(t, i) for i, t in enumerate(targets)]   # checked even without positives
        labels = torch.cat([p["labels"] for p in positives])
        if labels.numel() == 0:
            return {"loss_mask": logits.sum() * 0.0}
        mask_targets = torch.cat([project_masks(m, p["boxes"], p["gt_index"], self.mask_size)
                                  for m, p in zip(gt_masks, positives)])
        loss = F.binary_cross_entropy_with_logits(self._of_class(logits.float(), labels), mask_targets)
        return {"loss_mask": loss * self.loss_weight}

    def predict(self, logits: Tensor, detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Add ``mask_probs`` Float[K_b,M,M] (sigmoid of the predicted class's logits) to each
        image's detections; ``logits`` were computed for their boxes in order."""
        probs = self._of_class(logits.float(), torch.cat([d["labels"] for d in detections])).sigmoid()
        counts = [d["labels"].shape[0] for d in detections]
        return [dict(d, mask_probs=p) for d, p in zip(detections, probs.split(counts))]

    def paste(self, detection: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Replace ``mask_probs`` by ``masks`` Bool[K,H,W]: each probability map pasted at its box
        (the detection's ``boxes`` in the pixels of ``image_size``) and binarised."""
        result = dict(detection)
        probs = result.pop("mask_probs")
        result["masks"] = paste_masks(probs, result["boxes"], image_size, threshold=self.mask_threshold)
        return result


def _instance_masks(target: dict, index: int) -> Tensor:
    masks = target.get("masks")
    if masks is None:
        raise ValueError(f"target {index} (image_id {target.get('image_id')}) has no 'masks': the mask "
                         f"head trains on instance masks; use a dataset that provides them (e.g. "
                         f"CocoDetection with instance_masks: true; VOC detection has none)")
    if masks.dim() != 3 or masks.shape[0] != target["boxes"].shape[0]:
        raise ValueError(f"target {index}: 'masks' must be [N,H,W] with one mask per box "
                         f"({target['boxes'].shape[0]}), got {tuple(masks.shape)}")
    return masks
