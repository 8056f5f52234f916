"""The loss terms of the DETR families' set criterion (RT-DETR, D-FINE, DEIM), one function each.

Legend: B images, Q queries, C classes, M matched (prediction, target) pairs of the batch,
R = reg_max (R + 1 bins per box edge). Boxes are cxcywh normalised to the padded input.
``matched`` is ``(batch_idx Int64[M], query_idx Int64[M])``: where the matched predictions are.
Every loss is a sum over the batch divided by ``num_boxes`` (the target count, averaged over the
DDP ranks, at least 1) unless its docstring says otherwise. Classification is per-class sigmoid
(no background class): an unmatched query is a negative for every class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

__all__ = ["paired_iou", "varifocal_loss", "iou_aware_bce_loss", "matchability_aware_loss", "focal_loss",
           "box_losses",
           "edge_bin_targets", "fine_grained_localization_loss", "decoupled_distillation_loss"]


def paired_iou(boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """IoU of each box with its own target: Float[M,4] x Float[M,4] cxcywh -> Float[M]."""
    a = box_convert(boxes, "cxcywh", "xyxy")
    b = box_convert(target_boxes, "cxcywh", "xyxy")
    size = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = size[:, 0] * size[:, 1]
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    return inter / union


def _class_targets(logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor,
                   values: Tensor | None = None) -> Tensor:
    """Float[B,Q,C] zeros with ``values`` (default 1) at each matched query's label."""
    target = torch.zeros_like(logits)
    batch_idx, query_idx = matched
    target[batch_idx, query_idx, labels] = 1.0 if values is None else values.to(logits.dtype)
    return target


def varifocal_loss(logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor, ious: Tensor,
                   num_boxes: float, *, alpha: float = 0.75, gamma: float = 2.0) -> Tensor:
    """RT-DETR's varifocal loss (VarifocalNet, Zhang et al. 2021, IoU-aware classification).

    logits Float[B,Q,C]; labels Int64[M] and ious Float[M] (IoU of each matched box with its
    target) of the matched pairs. The target of a matched query's class is its IoU (a
    positive with IoU 0 contributes nothing), every other entry has target 0 and the weight
    ``alpha * sigmoid(logit)^gamma`` (focal down-weighting of easy negatives only)."""
    one_hot = _class_targets(logits, matched, labels)
    target = _class_targets(logits, matched, labels, ious.detach())
    score = logits.detach().sigmoid()
    weight = (alpha * score.pow(gamma) * (1 - one_hot) + target).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return loss / num_boxes


def iou_aware_bce_loss(logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor, ious: Tensor,
                       num_boxes: float, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """LW-DETR's IoU-aware BCE (as transformers' LwDetr / RfDetr loss): a matched query's class has
    target weight ``t = max(p^alpha * IoU^(1-alpha), 0.01)`` (detached) on ``-log p`` and ``1 - t``
    on ``-log(1 - p)``; every other entry weighs ``p^gamma`` on ``-log(1 - p)``, p = sigmoid(logit).
    Shapes as :func:`varifocal_loss`."""
    prob = logits.sigmoid()
    batch_idx, query_idx = matched
    quality = (prob[batch_idx, query_idx, labels].detach().pow(alpha) * ious.detach().pow(1 - alpha))
    quality = quality.clamp(min=0.01).to(logits.dtype)
    positive = _class_targets(logits, matched, labels, quality)
    negative = prob.pow(gamma).index_put((batch_idx, query_idx, labels), 1 - quality)
    loss = -positive * F.logsigmoid(logits) - negative * F.logsigmoid(-logits)
    return loss.sum() / num_boxes


def matchability_aware_loss(logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor,
                            ious: Tensor, num_boxes: float, *, gamma: float = 1.5,
                            alpha: float | None = None) -> Tensor:
    """DEIM's matchability-aware loss (MAL, Huang et al. 2025): as the varifocal loss, but the
    positive target is ``IoU^gamma`` with weight 1 (a low-IoU match still counts), negatives
    weigh ``alpha * sigmoid(logit)^gamma`` (``alpha`` None: 1). Shapes as :func:`varifocal_loss`."""
    one_hot = _class_targets(logits, matched, labels)
    target = _class_targets(logits, matched, labels, ious.detach().pow(gamma))
    score = logits.detach().sigmoid()
    negative_weight = score.pow(gamma) * (1.0 if alpha is None else alpha)
    weight = (negative_weight * (1 - one_hot) + one_hot).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return loss / num_boxes


def focal_loss(logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor, num_boxes: float, *,
               alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (RetinaNet) on one-hot class targets; logits Float[B,Q,C]."""
    one_hot = _class_targets(logits, matched, labels)
    return sigmoid_focal_loss(logits, one_hot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes


def box_losses(boxes: Tensor, target_boxes: Tensor, num_boxes: float) -> tuple[Tensor, Tensor]:
    """(L1, 1 - GIoU) summed over the matched pairs / num_boxes; Float[M,4] cxcywh each."""
    l1 = F.l1_loss(boxes, target_boxes, reduction="sum") / num_boxes
    giou = generalized_box_iou_loss(box_convert(boxes, "cxcywh", "xyxy"),
                                    box_convert(target_boxes, "cxcywh", "xyxy"), reduction="sum")
    return l1, giou / num_boxes


@torch.no_grad()
def edge_bin_targets(ref_points: Tensor, target_boxes: Tensor, project: Tensor,
                     reg_scale: Tensor) -> tuple[Tensor, Tensor]:
    """D-FINE's distribution targets of the four edges (left, top, right, bottom).

    ref_points Float[M,4] cxcywh (the initial boxes the edges are measured from), target_boxes
    Float[M,4] cxcywh, project Float[R+1] the bins' values W(n) (``fdr.weighting_function``),
    reg_scale Float[1]. An edge's distance, in units of ``ref size / reg_scale`` and offset by
    half a box as the decoder decodes it, lies between two bins: returns the left bin Int64[M*4]
    (in 0..R-1) and the weight of the right one Float[M*4] (linear interpolation between the two
    bins' values; a distance beyond the outermost bins puts all the weight on that bin)."""
    scale = reg_scale.abs()
    cx, cy, w, h = ref_points.float().unbind(-1)
    x1, y1, x2, y2 = box_convert(target_boxes.float(), "cxcywh", "xyxy").unbind(-1)
    unit_w, unit_h = w / scale + 1e-16, h / scale + 1e-16
    distance = torch.stack([(cx - x1) / unit_w, (cy - y1) / unit_h,
                            (x2 - cx) / unit_w, (y2 - cy) / unit_h], -1).reshape(-1) - 0.5 * scale
    project = project.float()
    reg_max = project.numel() - 1
    left = (project[None, :] <= distance[:, None]).sum(1) - 1          # -1 .. R
    below, above = left < 0, left >= reg_max
    left = left.clamp(0, reg_max - 1)
    low, high = project[left], project[left + 1]
    weight_right = ((distance - low) / (high - low)).clamp(0, 1)
    weight_right = torch.where(below, torch.zeros_like(weight_right), weight_right)
    weight_right = torch.where(above, torch.ones_like(weight_right), weight_right)
    return left, weight_right


def fine_grained_localization_loss(corners: Tensor, left_bin: Tensor, weight_right: Tensor,
                                   edge_weight: Tensor, num_boxes: float) -> Tensor:
    """D-FINE's FGL: cross-entropy of each edge distribution with its two neighbouring target
    bins, weighted by the interpolation weights and by ``edge_weight`` (the box's IoU).

    corners Float[M*4, R+1] logits; left_bin Int64[M*4], weight_right / edge_weight Float[M*4]."""
    ce_left = F.cross_entropy(corners, left_bin, reduction="none")
    ce_right = F.cross_entropy(corners, left_bin + 1, reduction="none")
    loss = ce_left * (1 - weight_right) + ce_right * weight_right
    return (loss * edge_weight.detach()).sum() / num_boxes


def decoupled_distillation_loss(corners: Tensor, teacher_corners: Tensor, teacher_logits: Tensor,
                                matched: tuple[Tensor, Tensor], ious: Tensor, *,
                                temperature: float = 5.0) -> Tensor:
    """D-FINE's DDF (GO-LSD): a layer's edge distributions distilled from the last layer's.

    corners / teacher_corners Float[B,Q,4*(R+1)], teacher_logits Float[B,Q,C], ious Float[M] of
    the matched pairs. Per edge: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    weighted by the IoU for a matched query and by the teacher's best class score otherwise. The
    matched and the unmatched edges are averaged separately and mixed with weights
    ``sqrt(count)`` each (so neither the few positives nor the many negatives dominate). Not
    divided by num_boxes. Zero (with a graph) when the layer is the teacher itself."""
    bins = corners.shape[-1] // 4
    student = corners.reshape(-1, bins)
    teacher = teacher_corners.reshape(-1, bins).detach()
    if torch.equal(student, teacher):
        return student.sum() * 0
    weight = teacher_logits.detach().sigmoid().max(-1).values
    positive = torch.zeros_like(weight, dtype=torch.bool)
    positive[matched] = True
    weight = weight.index_put(matched, ious.detach().to(weight.dtype))
    weight = weight.repeat_interleave(4, -1).reshape(-1)          # order (image, query, edge)
    positive = positive.repeat_interleave(4, -1).reshape(-1)
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                  reduction="none").sum(-1)
    loss = weight * kl * temperature ** 2
    num_pos, num_neg = positive.sum().float().sqrt(), (~positive).sum().float().sqrt()
    mean_pos = loss[positive].mean() if bool(positive.any()) else loss.sum() * 0
    mean_neg = loss[~positive].mean() if bool((~positive).any()) else loss.sum() * 0
    return (mean_pos * num_pos + mean_neg * num_neg) / (num_pos + num_neg)
