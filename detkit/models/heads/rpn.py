"""Region Proposal Network (Ren et al., "Faster R-CNN", 2015) over one or more feature maps.

Legend: B images, L levels, A anchors per location, Hi x Wi grid of level i, R = sum_i Hi*Wi*A
anchors of an image, P proposals kept for an image, M ground-truth boxes. Boxes are xyxy in
input pixels (the padded batch's coordinates; ``image_sizes`` are the unpadded (H, W)).

One shared 3x3 conv (+ReLU) then 1x1 convs predict, per anchor, an objectness logit and
(dx, dy, dw, dh) deltas (``BoxCoder`` weights 1, 1, 1, 1). Proposals: per image and level keep
the ``pre_nms_topk`` highest logits, decode, clip to the image, drop boxes smaller than
``min_box_size``, NMS per level, keep the ``post_nms_topk`` best of all levels. Training uses
``*_train`` numbers, evaluation ``*_test`` (chosen by ``self.training``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from ...registry import HEADS
from ...structures import ShapeSpec
from ..anchors import AnchorGenerator
from ..box_coder import BoxCoder
from ..matchers import NEGATIVE, Matcher, match_boxes, split_ignored
from ..sampling import sample_balanced

__all__ = ["RPNHead"]

FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))


@HEADS.register()
class RPNHead(nn.Module):
    """Class-agnostic objectness + box deltas per anchor; usable on its own.

    Args:
        input_shapes: the feature maps (neck or backbone output shapes).
        in_features: names of the maps to use (default: all of ``input_shapes``, finest first).
        anchor_sizes: per used level, anchor sizes in pixels (default FPN P2-P6: 32..512).
        aspect_ratios: anchor ratios h / w (one list for all levels, or one per level).
        stride_mode: ``geometric`` or ``torchvision`` (its stride rounding); see ``AnchorGenerator``.
        conv_depth: number of shared 3x3 convs.
        fg_iou_thresh / bg_iou_thresh: IoU for positive / below which negative.
        batch_size_per_image / positive_fraction: anchors sampled per image for the loss.
        pre_nms_topk_* / post_nms_topk_*: proposals kept per level before NMS / per image after.
        nms_thresh, score_thresh, min_box_size: proposal filtering (score is sigmoid(logit)).
        smooth_l1_beta: beta of the box-regression smooth L1 (1/9 as torchvision).
        loss_cls_weight / loss_box_weight: weights of ``loss_rpn_cls`` / ``loss_rpn_box``.
        crowd_ioa_thresh: anchors more than this fraction inside a crowd box are ignored.
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None = None,
                 anchor_sizes: Sequence[Sequence[float]] = FPN_ANCHOR_SIZES,
                 aspect_ratios: Sequence = (0.5, 1.0, 2.0), stride_mode: str = "geometric",
                 conv_depth: int = 1, fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_topk_train: int = 2000, pre_nms_topk_test: int = 1000,
                 post_nms_topk_train: int = 2000, post_nms_topk_test: int = 1000,
                 nms_thresh: float = 0.7, score_thresh: float = 0.0, min_box_size: float = 1e-3,
                 smooth_l1_beta: float = 1.0 / 9, loss_cls_weight: float = 1.0,
                 loss_box_weight: float = 1.0, crowd_ioa_thresh: float = 0.5):
        super().__init__()
        self.in_features = _select_features(input_shapes, in_features)
        shapes = [input_shapes[f] for f in self.in_features]
        if len({s.channels for s in shapes}) != 1:
            raise ValueError(f"RPNHead: the maps {self.in_features} must have equal channels "
                             f"(the head is shared), got {[s.channels for s in shapes]}")
        if len(anchor_sizes) != len(shapes):
            raise ValueError(f"RPNHead: anchor_sizes has {len(anchor_sizes)} levels but in_features "
                             f"{self.in_features} has {len(shapes)}")
        self.anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios,
                                                strides=[s.stride for s in shapes],
                                                stride_mode=stride_mode)
        anchor_counts = set(self.anchor_generator.num_anchors_per_location)
        if len(anchor_counts) != 1:
            raise ValueError(f"RPNHead: every level needs the same number of anchors per location "
                             f"(the head is shared), got {sorted(anchor_counts)}")
        channels, num_anchors = shapes[0].channels, anchor_counts.pop()
        self.conv = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(conv_depth))
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                assert layer.bias is not None  # every conv of the head is built with a bias
                nn.init.zeros_(layer.bias)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk_train, False: pre_nms_topk_test}
        self.post_nms_topk = {True: post_nms_topk_train, False: post_nms_topk_test}
        self.nms_thresh, self.score_thresh, self.min_box_size = nms_thresh, score_thresh, min_box_size
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_cls_weight, self.loss_box_weight = loss_cls_weight, loss_box_weight
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.generator: torch.Generator | None = None  # set for sampling independent of the global RNG

    def forward(self, features: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """Raw outputs, lists over levels: ``objectness`` Float[B,A,Hi,Wi], ``deltas``
        Float[B,A*4,Hi,Wi] and ``anchors`` Float[Hi*Wi*A,4]."""
        maps = [features[f] for f in self.in_features]
        logits, deltas = [], []
        for x in maps:
            for conv in self.conv:
                x = F.relu(conv(x), inplace=True)  # in place: a fresh conv output, saves a copy
            logits.append(self.objectness(x))
            deltas.append(self.deltas(x))
        anchors = self.anchor_generator([m.shape[-2:] for m in maps])
        return {"objectness": logits, "deltas": deltas, "anchors": [a.to(maps[0].device) for a in anchors]}

    @staticmethod
    def flatten_outputs(outputs: dict) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """(Float[B,R] logits, Float[B,R,4] deltas, Float[R,4] anchors, anchors per level).

        Order along R is (level, row, column, anchor), the order of the anchors.
        """
        logits, deltas = [], []
        for lg, dl in zip(outputs["objectness"], outputs["deltas"]):
            b, a, h, w = lg.shape
            logits.append(lg.permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(dl.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        per_level = [a.shape[0] for a in outputs["anchors"]]
        return (torch.cat(logits, 1).float(), torch.cat(deltas, 1).float(),
                torch.cat(outputs["anchors"]), per_level)

    # ----------------------------------------------------------------------------------- predict
    def predict(self, outputs: dict, image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Proposals per image: ``boxes`` Float[P,4] xyxy, ``scores`` Float[P] (sigmoid objectness).

        Uses the ``*_train`` top-k numbers in training mode. No gradient flows into proposals.
        """
        logits, deltas, anchors, per_level = self.flatten_outputs(outputs)
        logits, deltas = logits.detach(), deltas.detach()
        top_idx, levels = self._topk_per_level(logits, per_level)
        batch_idx = torch.arange(logits.shape[0], device=logits.device)[:, None]
        top_logits, top_deltas = logits[batch_idx, top_idx], deltas[batch_idx, top_idx]
        results = []
        for i, size in enumerate(image_sizes):
            boxes = self.box_coder.decode(top_deltas[i], anchors[top_idx[i]])
            results.append(self._filter_proposals(boxes, top_logits[i].sigmoid(), levels[top_idx[i]], size))
        return results

    def _topk_per_level(self, logits: Tensor, per_level: list[int]) -> tuple[Tensor, Tensor]:
        """Int64[B,K] indices of the top ``pre_nms_topk`` logits of each level, and Int64[R] level ids."""
        k_max = self.pre_nms_topk[self.training]
        indices, offset = [], 0
        for scores in logits.split(per_level, dim=1):
            k = min(k_max, scores.shape[1])
            indices.append(scores.topk(k, dim=1).indices + offset)
            offset += scores.shape[1]
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=logits.device)
                            for i, n in enumerate(per_level)])
        return torch.cat(indices, dim=1), levels

    def _filter_proposals(self, boxes: Tensor, scores: Tensor, levels: Tensor,
                          image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Clip, drop tiny / low-score boxes, NMS per level, keep the best ``post_nms_topk``."""
        boxes = clip_boxes_to_image(boxes, image_size)
        keep = remove_small_boxes(boxes, self.min_box_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = torch.where(scores >= self.score_thresh)[0]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes, scores, levels, self.nms_thresh)[: self.post_nms_topk[self.training]]
        return {"boxes": boxes[keep], "scores": scores[keep]}

    # -------------------------------------------------------------------------------------- loss
    def assign(self, anchors: Tensor, target: dict) -> tuple[Tensor, Tensor]:
        """Float[R,4] anchors vs one target -> (Int64[R] 1 fg / 0 bg / -1 ignore, Float[R,4] matched gt)."""
        gt_boxes, _, ignore = split_ignored(target)
        matches = match_boxes(self.matcher, gt_boxes, anchors, ignore, self.crowd_ioa_thresh)
        labels = (matches >= 0).long()
        labels[(matches < 0) & (matches != NEGATIVE)] = -1
        if gt_boxes.shape[0] == 0:
            return labels, torch.zeros_like(anchors)
        return labels, gt_boxes[matches.clamp(min=0)]

    def loss(self, outputs: dict, targets: list[dict], image_sizes: Sequence[tuple[int, int]] | None = None
             ) -> dict[str, Tensor]:
        """``loss_rpn_cls`` (BCE over sampled anchors) and ``loss_rpn_box`` (smooth L1 of positives).

        Both are normalised by the number of sampled anchors of the batch, as in torchvision.
        """
        logits, deltas, anchors, _ = self.flatten_outputs(outputs)
        sampled_logits, sampled_labels, pos_deltas, pos_targets = [], [], [], []
        for i, target in enumerate(targets):
            labels, matched = self.assign(anchors, target)
            pos, neg = sample_balanced(labels == 1, labels == 0, self.batch_size_per_image,
                                       self.positive_fraction, self.generator)
            idx = torch.cat([pos, neg])
            sampled_logits.append(logits[i, idx])
            sampled_labels.append(labels[idx].to(logits.dtype))
            pos_deltas.append(deltas[i, pos])
            pos_targets.append(self.box_coder.encode(matched[pos], anchors[pos]))
        return self.loss_terms(torch.cat(sampled_logits), torch.cat(sampled_labels),
                               torch.cat(pos_deltas), torch.cat(pos_targets))

    def loss_terms(self, logits: Tensor, labels: Tensor, pos_deltas: Tensor, pos_targets: Tensor
                   ) -> dict[str, Tensor]:
        """Float[S] logits / {0,1} labels of the S sampled anchors; Float[P,4] deltas and
        regression targets of the P positives among them."""
        num_sampled = max(logits.numel(), 1)
        loss_cls = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / num_sampled
        loss_box = F.smooth_l1_loss(pos_deltas, pos_targets, beta=self.smooth_l1_beta,
                                    reduction="sum") / num_sampled
        return {"loss_rpn_cls": loss_cls * self.loss_cls_weight,
                "loss_rpn_box": loss_box * self.loss_box_weight}


def _select_features(input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None) -> list[str]:
    """``in_features`` checked against ``input_shapes``; default all maps, finest (smallest stride) first."""
    if in_features is None:
        return sorted(input_shapes, key=lambda k: input_shapes[k].stride)
    missing = [f for f in in_features if f not in input_shapes]
    if missing:
        raise ValueError(f"in_features {missing} are not among the input feature maps "
                         f"{sorted(input_shapes)}")
    return list(in_features)
