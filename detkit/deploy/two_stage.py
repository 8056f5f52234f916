"""Batched, exportable two-stage inference: RPN proposals, RoI pooling, RoI head detections.

Legend: B images, L RPN levels, R_l anchors of level l, T = sum_l min(pre_nms_topk, R_l)
candidates per image, P = post_nms_topk proposals per image (padded), C classes, r pooled size;
``hw`` Int64[2] is the padded input size (RoI pooling scales), ``sizes`` Int64[B,2] each image's
unpadded (H, W): proposals and detections are clipped and size-filtered at it, as in PyTorch.

The maths is the heads' own (``RPNHead.flatten_outputs`` / ``box_coder``, the pooler of
``RoIHead``, ``box_head`` / ``cls_score`` / ``bbox_pred``, ``RFCNHead``'s maps); this module only
replaces per-image loops and lists of proposals by padded ``[B, P]`` tensors with a validity mask,
so that the batch size and image size stay dynamic in an exported graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ..models.anchors import grid_anchors
from .ops import INVALID_SCORE, clip_boxes, dynamic_min, gather_padded, grouped_nms, top_per_image
from .postprocess import Candidates, pack

__all__ = ["rpn_proposals", "pool_rois", "roi_head_candidates", "rfcn_vote", "group_candidates",
           "mask_probabilities"]


def rpn_anchors(rpn: Any, maps: list[Tensor]) -> Tensor:
    """Float[R,4] anchors of all levels for the maps' (traced) sizes, as ``AnchorGenerator``."""
    gen = rpn.anchor_generator
    sizes = [(m.shape[-2], m.shape[-1]) for m in maps]
    strides = gen.level_strides(sizes)
    return torch.cat([grid_anchors(getattr(gen, f"cell_anchors_{i}"), size, stride).to(maps[0].dtype)
                      for i, (size, stride) in enumerate(zip(sizes, strides))])


def rpn_proposals(rpn: Any, features: dict[str, Tensor], sizes: Tensor, num_images
                  ) -> tuple[Tensor, Tensor]:
    """Proposals Float[B,P,4] and valid Bool[B,P], ``RPNHead.predict`` (test settings) batched:
    per level top-k logits, decode, clip, drop small / low-score boxes, NMS per level, best P."""
    outputs = rpn(features)
    maps = [features[f] for f in rpn.in_features]
    logits, deltas, _, _ = rpn.flatten_outputs(outputs)                              # [B,R], [B,R,4]
    anchors = rpn_anchors(rpn, maps)
    top_idx: list[Tensor] = []
    levels: list[Tensor] = []
    start = 0
    for lg in outputs["objectness"]:
        count = lg.shape[1] * lg.shape[2] * lg.shape[3]
        _, idx = logits[:, start:start + count].topk(dynamic_min(rpn.pre_nms_topk[False], count), dim=1)
        top_idx.append(idx + start)
        levels.append(torch.full_like(idx, len(levels)))
        start = start + count
    index, level = torch.cat(top_idx, 1), torch.cat(levels, 1)                    # [B,T]
    batch = torch.arange(logits.shape[0], device=logits.device)[:, None]
    scores = logits[batch, index].sigmoid()
    boxes = rpn.box_coder.decode(deltas[batch, index].reshape(-1, 4), anchors[index].reshape(-1, 4))
    boxes = clip_boxes(boxes.reshape(index.shape + (4,)), sizes)
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (wh >= rpn.min_box_size).all(-1) & (scores >= rpn.score_thresh)
    level_ids = torch.arange(len(levels), device=level.device)[None, :, None]
    columns = valid[:, None] & (level[:, None] == level_ids)                       # [B,L,T]
    masked = torch.where(columns, scores[:, None], torch.full_like(scores[:, None], INVALID_SCORE))
    kept = grouped_nms(boxes, masked, rpn.nms_thresh)
    flat = kept[:, 0] * index.shape[1] + kept[:, 2]
    pick, ok = top_per_image(kept[:, 0], scores.reshape(-1)[flat], num_images, rpn.post_nms_topk[False])
    return gather_padded(boxes.reshape(-1, 4)[flat], pick), ok


def to_rois(proposals: Tensor) -> Tensor:
    """Float[B,P,4] -> Float[B*P,5] (image index, x1, y1, x2, y2), torchvision's RoI format."""
    b, p = proposals.shape[0], proposals.shape[1]
    ids = torch.arange(b, device=proposals.device, dtype=proposals.dtype)[:, None, None].expand(b, p, 1)
    return torch.cat([ids, proposals], dim=2).reshape(-1, 5)


def pool_rois(pooler: Any, features: dict[str, Tensor], rois: Tensor, hw: Tensor) -> Tensor:
    """RoI features of Float[K,5] rois: what ``pooler(features, proposals, image_sizes)`` gives
    for ``MultiScaleRoIAlign`` (FPN level rule) and ``SPPRoIPool`` (its own per-level pooling)."""
    from ..models.spp_pool import SPPRoIPool, fpn_level_of_boxes

    maps = [features[f] for f in pooler.featmap_names]
    if isinstance(pooler, MultiScaleRoIAlign):
        scales = list(pooler.scales)

        def pool(feat: Tensor, r: Tensor, scale: float) -> Tensor:
            return roi_align(feat, r, pooler.output_size, scale, pooler.sampling_ratio)
    elif isinstance(pooler, SPPRoIPool):
        # As SPPRoIPool: each level's scale is the power of two nearest to map / image height
        # (a trace-time constant, like roi_pool's spatial_scale attribute).
        scales = [2.0 ** round(math.log2(float(m.shape[-2]) / float(hw[0]))) for m in maps]

        def pool(feat: Tensor, r: Tensor, scale: float) -> Tensor:
            return pooler._pool(feat, r, scale)[:, :, None, None]
    else:
        raise TypeError(f"{type(pooler).__name__}: no exportable RoI pooling")
    if len(maps) == 1:
        return pool(maps[0], rois, scales[0])
    exps = [round(-math.log2(s)) for s in scales]
    if isinstance(pooler, MultiScaleRoIAlign):
        levels = pooler.map_levels([rois[:, 1:]]) + min(exps)
    else:
        levels = fpn_level_of_boxes(rois[:, 1:], min(exps), max(exps), pooler.canonical_scale,
                                    pooler.canonical_level)
    out: Tensor | None = None
    for feat, scale, exp in zip(maps, scales, exps):
        idx = torch.where(levels == exp)[0]
        pooled = pool(feat, rois[idx], scale)
        if out is None:
            out = pooled.new_zeros([rois.shape[0]] + [int(d) for d in pooled.shape[1:]])  # static C, r
        # scatter (ONNX ScatterElements) rather than out[idx] = ..., whose traced form bakes in
        # the number of RoIs a level had at export time
        out = out.scatter(0, idx.view(-1, *([1] * (pooled.dim() - 1))).expand_as(pooled), pooled)
    assert out is not None
    return out


def _channel_groups(maps: Tensor, k: int) -> Tensor:
    """Float[B, O*k*k, H, W] -> Float[B*k*k, O, H, W]: bin group (i, j) of image b at b*k*k + i*k + j
    (input channel ``(o * k + i) * k + j`` is bin (i, j) of output channel o)."""
    b, ch, h, w = maps.shape
    return maps.reshape(b, ch // (k * k), k * k, h, w).transpose(1, 2).reshape(b * k * k, -1, h, w)


def _bin_images(rois: Tensor, k: int) -> Tensor:
    """Float[K,k*k]: the index of each RoI bin's channel group image (see ``_channel_groups``)."""
    return rois[:, :1] * (k * k) + torch.arange(k * k, device=rois.device, dtype=rois.dtype)[None]


def rfcn_vote(maps: Tensor, rois: Tensor, k: int, spatial_scale: float, sampling_ratio: int) -> Tensor:
    """``torchvision.ops.ps_roi_align`` averaged over the k x k bins, from ONNX ``RoiAlign``.

    Float[B, O*k*k, H, W] maps, Float[K,5] rois -> Float[K, O]. Bin (i, j) of an RoI equals a
    1 x 1 RoIAlign (``aligned=True``: the same -0.5 pixel shift and sampling grid) of the bin's
    own sub-box on its channel group; the groups become images of the batch, so one RoiAlign
    call pools every bin.
    """
    x1, y1, x2, y2 = rois[:, 1:2], rois[:, 2:3], rois[:, 3:4], rois[:, 4:5]
    steps = torch.arange(k, device=rois.device, dtype=rois.dtype)[None]
    bw, bh = (x2 - x1) / k, (y2 - y1) / k
    xs, ys = x1 + steps * bw, y1 + steps * bh                                       # [K,k]
    sub = torch.stack([xs[:, None, :].expand(-1, k, -1), ys[:, :, None].expand(-1, -1, k),
                       (xs + bw)[:, None, :].expand(-1, k, -1), (ys + bh)[:, :, None].expand(-1, -1, k)],
                      dim=-1).reshape(-1, k * k, 4)                                 # bin i*k+j
    sub_rois = torch.cat([_bin_images(rois, k)[..., None], sub], dim=-1).reshape(-1, 5)
    pooled = roi_align(_channel_groups(maps, k), sub_rois, 1, spatial_scale, sampling_ratio, aligned=True)
    return pooled.reshape(rois.shape[0], k * k, -1).mean(dim=1)


def roi_outputs(roi_head: Any, features: dict[str, Tensor], rois: Tensor, hw: Tensor
                ) -> tuple[Tensor, Tensor]:
    """(class_logits Float[K,C+1], box_deltas Float[K,C*4 or 4]) of ``RoIHead`` / ``RFCNHead``."""
    from ..models.heads.rfcn_head import RFCNHead
    from ..models.ps_roi_pool import ps_roi_avg_pool

    if isinstance(roi_head, RFCNHead):
        x = F.relu(roi_head.reduce(features[roi_head.in_feature]))
        k, scale = roi_head.group_size, 1.0 / roi_head.stride
        if roi_head.align:
            return (rfcn_vote(roi_head.cls_maps(x), rois, k, scale, roi_head.sampling_ratio),
                    rfcn_vote(roi_head.box_maps(x), rois, k, scale, roi_head.sampling_ratio))
        # the head's own pooling (a summed-area table in plain tensor ops) exports as it is
        return (ps_roi_avg_pool(roi_head.cls_maps(x), rois, k, scale).mean(dim=(2, 3)),
                ps_roi_avg_pool(roi_head.box_maps(x), rois, k, scale).mean(dim=(2, 3)))
    maps = {f: features[f] for f in roi_head.in_features}
    x = roi_head.box_head(pool_rois(roi_head.pooler, maps, rois, hw))
    return roi_head.cls_score(x), roi_head.bbox_pred(x)


def roi_head_candidates(roi_head: Any, features: dict[str, Tensor], proposals: Tensor,
                        proposal_ok: Tensor, hw: Tensor, sizes: Tensor, num_images
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``RoIHeadBase.predict`` batched: softmax scores, class boxes, clip, score / size filter,
    NMS per (image, class), ``detections_per_image`` best -> the four padded outputs."""
    rois = to_rois(proposals)
    logits, deltas = roi_outputs(roi_head, features, rois, hw)
    c = roi_head.num_classes
    b, p = proposals.shape[0], proposals.shape[1]
    scores = F.softmax(logits.float(), dim=-1)[:, :c].reshape(b, p, c)
    boxes = roi_head.box_coder.decode(deltas.float(), rois[:, 1:])
    boxes = clip_boxes(boxes.reshape(b, p, -1, 4).expand(-1, -1, c, -1), sizes)        # [B,P,C,4]
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = proposal_ok[..., None] & (scores > roi_head.score_thresh) & (wh >= 1e-2).all(-1)
    return group_candidates(boxes, scores, valid, roi_head.nms_thresh,
                            roi_head.detections_per_image, num_images)


def group_candidates(boxes: Tensor, scores: Tensor, valid: Tensor, iou: float, k: int, num_images
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-specific boxes Float[B,P,C,4] / scores Float[B,P,C]: NMS per (image, class) group."""
    b, p, c = scores.shape[0], scores.shape[1], scores.shape[2]
    group_boxes = boxes.permute(0, 2, 1, 3).reshape(-1, p, 4)                      # [B*C,P,4]
    group_scores = torch.where(valid, scores, torch.full_like(scores, INVALID_SCORE))
    group_scores = group_scores.permute(0, 2, 1).reshape(-1, 1, p)
    kept = grouped_nms(group_boxes, group_scores, iou)
    group, cand = kept[:, 0], kept[:, 2]
    labels = torch.arange(c, device=scores.device)[None, :, None].expand(b, c, p)
    flat = Candidates(group_boxes, group_scores.reshape(-1, p), labels.reshape(-1, p), valid, iou, k)
    return pack(group, cand, flat, num_images, p, image=group // c)


def mask_probabilities(mask_head: Any, features: dict[str, Tensor], boxes: Tensor, labels: Tensor,
                       hw: Tensor) -> Tensor:
    """``MaskRoIHead`` forward + predict batched: Float[B,K,M,M] mask probabilities of the detected
    class for the padded detections Float[B,K,4] / Int64[B,K] (padding rows: label -1, any values).
    Pasting them into the image stays outside the graph (``detkit.models.mask_paste``)."""
    b, k = boxes.shape[0], boxes.shape[1]
    x = pool_rois(mask_head.pooler, {f: features[f] for f in mask_head.in_features}, to_rois(boxes), hw)
    for conv in mask_head.convs:
        x = F.relu(conv(x))
    logits = mask_head.logits(F.relu(mask_head.deconv(x)))                            # [B*K,C,M,M]
    if logits.shape[1] > 1:
        index = labels.reshape(-1).clamp(min=0)[:, None, None, None].expand(-1, 1, *logits.shape[2:])
        logits = logits.gather(1, index)
    return logits.sigmoid().reshape(b, k, logits.shape[-2], logits.shape[-1])
