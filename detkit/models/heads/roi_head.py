"""Fast R-CNN box head on region proposals: RoIAlign -> box head -> class scores + class boxes.

Legend: B images, C foreground classes, P_b proposals of image b, S sampled RoIs (training),
R = sum_b P_b RoIs of the batch, D box-head feature size, r pooler resolution. Boxes are xyxy in
input pixels. Class index ``C`` (the last) is background; foreground labels are 0..C-1.

Usage (also what ``TwoStageDetector`` does)::

    if training:
        proposals, samples = roi_head.sample_proposals(proposals, targets)  # assign + sample
    outputs = roi_head(features, proposals, image_sizes)                  # Float[R, C+1], Float[R, C*4]
    losses = roi_head.loss(outputs, samples)                               # training
    detections = roi_head.predict(outputs, image_sizes)                    # evaluation
"""

from __future__ import annotations

import math
from typing import Any, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, remove_small_boxes
from torchvision.ops.poolers import initLevelMapper

from ...registry import HEADS, ROI_POOLERS, ConfigError, check_kwargs
from ...structures import ShapeSpec
from ..backbones.resnet import ResNet
from ..box_coder import BoxCoder
from ..matchers import NEGATIVE, Matcher, ignore_flags, match_boxes, split_ignored
from ..sampling import sample_balanced

__all__ = ["RoIHeadBase", "RoIHead", "TwoMLPHead", "ConvFCHead", "Res5Head", "make_pooler"]


def make_pooler(in_features: Sequence[str], strides: Sequence[int], resolution: int,
                sampling_ratio: int, canonical_scale: int = 224, canonical_level: int = 4
                ) -> MultiScaleRoIAlign:
    """torchvision's MultiScaleRoIAlign with each level's scale set from the known strides.

    torchvision would infer the scales from the first batch's image size and cache them; a first
    batch of tiny images (where ``feature / image`` rounds to the wrong power of two) would then
    fix wrong scales for good. RoIs go to FPN level ``floor(canonical_level + log2(sqrt(area) /
    canonical_scale))`` clamped to the available levels (FPN paper, eq. 1).
    """
    levels = [math.log2(s) for s in strides]
    if any(abs(lv - round(lv)) > 1e-6 for lv in levels) or \
            any(round(b - a) != 1 for a, b in zip(levels, levels[1:])):
        raise ValueError(f"RoI pooling needs strides that are consecutive powers of two, got "
                         f"{list(strides)} for {list(in_features)}")
    pooler = MultiScaleRoIAlign(list(in_features), resolution, sampling_ratio,
                                canonical_scale=canonical_scale, canonical_level=canonical_level)
    pooler.scales = [1.0 / s for s in strides]
    pooler.map_levels = initLevelMapper(round(levels[0]), round(levels[-1]),
                                        canonical_scale=canonical_scale, canonical_level=canonical_level)
    return pooler


class RoIHeadBase(nn.Module):
    """What every per-RoI box head shares: RoI assignment and sampling, the Fast R-CNN losses and
    post-processing. Subclasses add the layers and ``forward(features, proposals, image_sizes)``
    returning ``class_logits`` Float[R, C+1], ``box_deltas`` Float[R, C*4] (or Float[R, 4]
    class-agnostic) and ``proposals`` (``RoIHead``: RoIAlign + box head; ``RFCNHead``:
    position-sensitive score maps).

    Args:
        num_classes: number of foreground classes.
        fg_iou_thresh / bg_iou_thresh: proposal IoU for foreground / below which background.
        batch_size_per_image / positive_fraction: RoIs sampled per image for the loss.
        add_gt_as_proposals: also train on the ground-truth boxes as proposals.
        bbox_reg_weights: BoxCoder weights; class_agnostic_box: one box per RoI instead of C.
        score_thresh / nms_thresh / detections_per_image: post-processing.
        smooth_l1_beta, loss_cls_weight, loss_box_weight: loss settings.
        crowd_ioa_thresh: proposals more than this fraction inside a crowd box are not negatives.
    """

    def __init__(self, *, num_classes: int, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 add_gt_as_proposals: bool = True,
                 bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 class_agnostic_box: bool = False, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_image: int = 100,
                 smooth_l1_beta: float = 1.0 / 9, loss_cls_weight: float = 1.0,
                 loss_box_weight: float = 1.0, crowd_ioa_thresh: float = 0.5):
        super().__init__()
        self.num_classes = int(num_classes)
        self.class_agnostic_box = class_agnostic_box
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.add_gt_as_proposals = add_gt_as_proposals
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_image = detections_per_image
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_cls_weight, self.loss_box_weight = loss_cls_weight, loss_box_weight
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.generator: torch.Generator | None = None  # set for sampling independent of the global RNG

    # ---------------------------------------------------------------------------------- training
    @torch.no_grad()
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict]
                         ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Assign and sample RoIs per image -> (sampled Float[S_b,4] boxes, per image dict with
        ``labels`` Int64[S_b] (C = background), ``gt_boxes`` Float[S_b,4] (zeros for background)
        and ``gt_index`` Int64[S_b], the matched box's index in ``target["boxes"]`` (-1 for
        background; the mask head uses it to find the instance mask)).
        """
        sampled_boxes, samples = [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels, ignore = split_ignored(target)
            gt_boxes = gt_boxes.to(boxes.dtype)
            if self.add_gt_as_proposals:
                boxes = torch.cat([boxes, gt_boxes])
            matches = match_boxes(self.matcher, gt_boxes, boxes, ignore, self.crowd_ioa_thresh)
            pos, neg = sample_balanced(matches >= 0, matches == NEGATIVE, self.batch_size_per_image,
                                       self.positive_fraction, self.generator)
            idx = torch.cat([pos, neg]).sort().values
            matched = matches[idx]
            labels = torch.full_like(matched, self.num_classes)
            gt_sampled = torch.zeros((idx.numel(), 4), dtype=boxes.dtype, device=boxes.device)
            fg = matched >= 0
            labels[fg] = gt_labels[matched[fg]]
            gt_sampled[fg] = gt_boxes[matched[fg]]
            gt_index = torch.full_like(matched, -1)
            gt_index[fg] = torch.where(~ignore_flags(target))[0][matched[fg]]
            sampled_boxes.append(boxes[idx])
            samples.append({"labels": labels, "gt_boxes": gt_sampled, "gt_index": gt_index})
        return sampled_boxes, samples

    def loss(self, outputs: dict, samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``loss_cls`` (softmax CE, mean over S) and ``loss_box`` (smooth L1 of the foreground
        RoIs' deltas for their class, summed and divided by S, as torchvision)."""
        logits = outputs["class_logits"].float()
        deltas = outputs["box_deltas"].float()
        labels = torch.cat([s["labels"] for s in samples])
        num = labels.numel()
        if num == 0:  # no RoI at all: keep the graph, contribute nothing
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box": zero.clone()}
        fg = torch.where(labels < self.num_classes)[0]
        rois = torch.cat(outputs["proposals"])[fg]
        gt_boxes = torch.cat([s["gt_boxes"] for s in samples])[fg]
        deltas = deltas.view(num, -1, 4)
        class_idx = labels[fg] if deltas.shape[1] > 1 else torch.zeros_like(fg)
        loss_cls = F.cross_entropy(logits, labels)
        loss_box = F.smooth_l1_loss(deltas[fg, class_idx], self.box_coder.encode(gt_boxes, rois),
                                    beta=self.smooth_l1_beta, reduction="sum") / num
        return {"loss_cls": loss_cls * self.loss_cls_weight, "loss_box": loss_box * self.loss_box_weight}

    @torch.no_grad()
    def per_roi_loss(self, outputs: dict, samples: list[dict[str, Tensor]]) -> Tensor:
        """Float[S] classification + box loss of each sampled RoI (the hard-example score of OHEM)."""
        logits = outputs["class_logits"].float()
        labels = torch.cat([s["labels"] for s in samples])
        loss = F.cross_entropy(logits, labels, reduction="none")
        fg = torch.where(labels < self.num_classes)[0]
        if fg.numel():
            deltas = outputs["box_deltas"].float().view(labels.numel(), -1, 4)
            class_idx = labels[fg] if deltas.shape[1] > 1 else torch.zeros_like(fg)
            rois = torch.cat(outputs["proposals"])[fg]
            gt_boxes = torch.cat([s["gt_boxes"] for s in samples])[fg]
            box = F.smooth_l1_loss(deltas[fg, class_idx], self.box_coder.encode(gt_boxes, rois),
                                   beta=self.smooth_l1_beta, reduction="none").sum(dim=1)
            loss[fg] += box
        return loss

    # -------------------------------------------------------------------------------- evaluation
    def predict(self, outputs: dict, image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` Float[K,4] xyxy, ``scores`` Float[K], ``labels`` Int64[K]."""
        proposals = outputs["proposals"]
        scores = F.softmax(outputs["class_logits"].float(), dim=-1)[:, : self.num_classes]
        deltas = outputs["box_deltas"].float()
        boxes = self.box_coder.decode(deltas, torch.cat(proposals))
        boxes = boxes.view(deltas.shape[0], deltas.shape[1] // 4, 4).expand(-1, self.num_classes, 4)
        counts = [p.shape[0] for p in proposals]
        return [self.postprocess(b, s, size) for b, s, size in
                zip(boxes.split(counts), scores.split(counts), image_sizes)]

    def postprocess(self, boxes: Tensor, scores: Tensor, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Float[P,C,4] boxes and Float[P,C] scores of one image -> detections after the score
        threshold, per-class NMS and the ``detections_per_image`` cap."""
        boxes = clip_boxes_to_image(boxes, image_size).reshape(-1, 4)
        labels = torch.arange(self.num_classes, device=scores.device).expand_as(scores).reshape(-1)
        scores = scores.reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_image]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


@HEADS.register()
class RoIHead(RoIHeadBase):
    """Fast R-CNN box head: RoI feature pooling -> box head -> per-RoI (C+1)-way classification
    and class-specific box regression (the training and post-processing of ``RoIHeadBase``).

    Args:
        input_shapes / num_classes: feature maps and number of foreground classes.
        in_features: maps to pool from (default: every map with stride <= 32, i.e. P2-P5 of an
            FPN, not the P6 that only the RPN uses).
        box_head: module mapping Float[R, ch, r, r] -> Float[R, D] with an ``out_dim`` attribute
            (default ``TwoMLPHead`` with 1024 units). In a config: ``{type: TwoMLPHead}``,
            ``{type: ConvFCHead}`` or ``{type: Res5Head}`` (ResNet-C4).
        roi_pooler: ``None`` for RoIAlign (``MultiScaleRoIAlign``), or a module with the same call
            signature, e.g. ``SPPRoIPool`` (config: ``roi_pooler: {type: SPPRoIPool, bins: [1, 2, 4]}``).
        pooler_resolution / sampling_ratio / canonical_*: RoIAlign settings (see make_pooler).
        Other keyword arguments: see ``RoIHeadBase``.
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 in_features: Sequence[str] | None = None, box_head: nn.Module | None = None,
                 roi_pooler: nn.Module | None = None, pooler_resolution: int = 7,
                 sampling_ratio: int = 2, canonical_scale: int = 224, canonical_level: int = 4,
                 **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)
        self.in_features = pooled_features(input_shapes, in_features)
        channels = input_shapes[self.in_features[0]].channels
        self.pooler = roi_pooler if roi_pooler is not None else make_pooler(
            self.in_features, [input_shapes[f].stride for f in self.in_features],
            pooler_resolution, sampling_ratio, canonical_scale, canonical_level)
        # Any module with an ``out_dim`` (TwoMLPHead, Res5Head, a conv head, a user's head).
        head: Any = box_head if box_head is not None else TwoMLPHead(
            **box_head_inputs(self.pooler, channels, pooler_resolution))
        self.box_head = head
        self.cls_score = nn.Linear(head.out_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(head.out_dim, 4 * (1 if self.class_agnostic_box else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, input_shapes: dict[str, ShapeSpec],
                    num_classes: int) -> "RoIHead":
        """Build ``cfg['roi_pooler']`` and ``cfg['box_head']`` (a HEADS node given ``in_channels``
        and ``resolution`` of the pooled features) first."""
        cfg = dict(cfg)
        box_cfg = cfg.pop("box_head", None)
        pooler_cfg = cfg.pop("roi_pooler", None)
        check_kwargs(cls, dict(cfg, input_shapes=input_shapes, num_classes=num_classes), path, cls.__name__)
        try:
            names = pooled_features(input_shapes, cfg.get("in_features"))
        except ValueError as e:
            raise ConfigError(f"{path}.in_features: {e}") from None
        roi_pooler = None
        if pooler_cfg is not None:
            roi_pooler = ROI_POOLERS.build(pooler_cfg, f"{path}.roi_pooler", featmap_names=names,
                                           strides=[input_shapes[n].stride for n in names])
        box_head = None
        if box_cfg is not None:
            pooled = box_head_inputs(roi_pooler, input_shapes[names[0]].channels,
                                     cfg.get("pooler_resolution", 7))
            box_head = HEADS.build(box_cfg, f"{path}.box_head", **pooled)
        try:
            return cls(input_shapes=input_shapes, num_classes=num_classes, box_head=box_head,
                       roi_pooler=roi_pooler, **cfg)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path} ({cls.__name__}): {e}") from e

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> dict:
        """RoIs Float[P_b,4] per image -> ``class_logits`` Float[R,C+1], ``box_deltas`` Float[R,C*4]
        (or Float[R,4] class-agnostic) and the ``proposals`` themselves."""
        maps = {f: features[f] for f in self.in_features}
        x = self.box_head(self.pooler(maps, proposals, list(image_sizes)))
        return {"class_logits": self.cls_score(x), "box_deltas": self.bbox_pred(x), "proposals": proposals}


def box_head_inputs(pooler: nn.Module | None, channels: int, resolution: int) -> dict[str, int]:
    """``in_channels`` / ``resolution`` of the pooled RoI features a box head receives.

    RoIAlign gives Float[R, ch, r, r]; a pooler with ``output_dim`` (SPP) gives a fixed-length
    vector per RoI, shaped Float[R, output_dim, 1, 1].
    """
    output_dim = getattr(pooler, "output_dim", None)
    if callable(output_dim):
        return {"in_channels": output_dim(channels), "resolution": 1}
    return {"in_channels": channels, "resolution": resolution}


@HEADS.register()
class TwoMLPHead(nn.Module):
    """Flatten Float[R,ch,r,r] -> fc6 -> ReLU -> fc7 -> ReLU -> Float[R,fc_dim] (FPN's box head)."""

    def __init__(self, *, in_channels: int, resolution: int, fc_dim: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_dim = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)), inplace=True)), inplace=True)


@HEADS.register()
class ConvFCHead(nn.Module):
    """``num_conv`` 3x3 convs (+GroupNorm/BatchNorm) then ``num_fc`` FCs: Float[R,ch,r,r] -> Float[R,fc_dim].

    ``norm``: ``"GN"`` (32 groups, the "4conv1fc-GN" head of Wu & He 2018), ``"BN"`` or ``"none"``.
    """

    def __init__(self, *, in_channels: int, resolution: int, num_conv: int = 4, conv_dim: int = 256,
                 num_fc: int = 1, fc_dim: int = 1024, norm: str = "GN"):
        super().__init__()
        if norm not in ("GN", "BN", "none"):
            raise ValueError(f"ConvFCHead norm must be 'GN', 'BN' or 'none', got {norm!r}")
        if norm == "GN" and conv_dim % 32:
            raise ValueError(f"ConvFCHead: GroupNorm uses 32 groups, conv_dim {conv_dim} is not "
                             f"a multiple of 32")
        layers: list[nn.Module] = []
        for i in range(num_conv):
            layers.append(nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1,
                                    bias=norm == "none"))
            if norm != "none":
                layers.append(nn.GroupNorm(32, conv_dim) if norm == "GN" else nn.BatchNorm2d(conv_dim))
            layers.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*layers)
        dim = (conv_dim if num_conv else in_channels) * resolution * resolution
        self.fcs = nn.ModuleList(nn.Linear(dim if i == 0 else fc_dim, fc_dim) for i in range(num_fc))
        self.out_dim = fc_dim if num_fc else dim
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.convs(x).flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x


@HEADS.register()
class Res5Head(nn.Module):
    """ResNet-C4's box head: a ResNet ``layer4`` (stride 2) on Float[R,ch,r,r] RoIs, then
    global average pooling -> Float[R, 512 * expansion]. Use with ``pooler_resolution: 14``.

    ``norm`` and ``weights`` are those of detkit's ``ResNet`` (e.g. ``FrozenBN`` and
    ``IMAGENET1K_V1`` or a local torchvision ResNet file, of which the ``layer4`` weights are used).
    """

    def __init__(self, *, in_channels: int, resolution: int, depth: int = 50, norm: str = "BN",
                 weights: str | None = None):
        super().__init__()
        self.layer4 = cast(nn.Sequential,
                           ResNet(depth=depth, out_features=["c5"], norm=norm, weights=weights).layer4)
        blocks: list[Any] = list(self.layer4)   # torchvision Bottleneck / BasicBlock (untyped)
        expected = blocks[0].conv1.in_channels
        if in_channels != expected:
            raise ValueError(f"Res5Head(depth={depth}) expects {expected}-channel RoI features "
                             f"(ResNet-{depth} c4), got {in_channels}")
        self.out_dim = 512 * blocks[-1].expansion
        self.resolution = resolution

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(x).mean(dim=(2, 3))


def pooled_features(input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None) -> list[str]:
    """``in_features`` (checked), or every map of stride <= 32, finest first."""
    if in_features is None:
        names = [k for k in sorted(input_shapes, key=lambda k: input_shapes[k].stride)
                 if input_shapes[k].stride <= 32]
        return names or [min(input_shapes, key=lambda k: input_shapes[k].stride)]
    missing = [f for f in in_features if f not in input_shapes]
    if missing:
        raise ValueError(f"in_features {missing} are not among the input feature maps {sorted(input_shapes)}")
    if len({input_shapes[f].channels for f in in_features}) != 1:
        raise ValueError(f"in_features {list(in_features)} must have equal channels")
    return list(in_features)
