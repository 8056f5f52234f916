"""R-FCN head (Dai et al., "R-FCN: Object Detection via Region-based Fully Convolutional
Networks", NIPS 2016): position-sensitive score maps pooled per RoI, voted by averaging.

Legend: B images, C foreground classes (index C = background), k x k position-sensitive bins,
R RoIs of the batch, D reduced channels, H x W the feature map.

All per-RoI computation of Faster R-CNN's box head is replaced by convolutions shared over the
whole image: a 1x1 conv reduces the backbone map to D channels (the paper: 1024 on ResNet-101's
dilated C5, stride 16), then a conv predicts k^2 (C + 1) class score maps and a conv predicts
k^2 * 4 class-agnostic box maps. Bin (i, j) of an RoI is pooled only from the channel group
(i, j) of the maps (the paper's average pooling over every cell the bin touches,
``detkit.models.ps_roi_pool``; or torchvision's bilinear ``ps_roi_align`` with ``align=True``),
and the k x k bins vote by averaging into C + 1 logits and 4 box deltas. Training reuses
Faster R-CNN's RoI assignment, sampling and losses (``RoIHeadBase``) with class-agnostic box
regression, as the paper. Online hard example mining (the paper trains with OHEM: losses of all
proposals are evaluated and the ``ohem_batch_size`` hardest per image, after NMS at 0.7 on the
RoIs, are back-propagated) is ``ohem: true``; otherwise the balanced sampler picks the RoIs.
"""

from __future__ import annotations

from typing import Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, ps_roi_align

from ...registry import HEADS
from ...structures import ShapeSpec
from ..ps_roi_pool import ps_roi_avg_pool
from .roi_head import RoIHeadBase

__all__ = ["RFCNHead", "position_sensitive_vote"]


def position_sensitive_vote(maps: Tensor, rois: list[Tensor], group_size: int, spatial_scale: float,
                            align: bool = False, sampling_ratio: int = 2) -> Tensor:
    """Float[B, k*k*O, H, W] maps + Float[R_b, 4] RoIs per image -> Float[R, O] averaged bin votes.

    Bin (i, j) of output channel o reads input channel ``(o * k + i) * k + j``. ``align=False``:
    the average over every map cell the bin touches (``ps_roi_avg_pool``, the paper's pooling);
    ``align=True``: ``torchvision.ops.ps_roi_align`` with ``sampling_ratio`` points per bin axis.
    """
    if align:
        pooled = ps_roi_align(maps, rois, group_size, spatial_scale, sampling_ratio)
    else:
        pooled = ps_roi_avg_pool(maps, rois, group_size, spatial_scale)
    return pooled.mean(dim=(2, 3))


@HEADS.register()
class RFCNHead(RoIHeadBase):
    """R-FCN per-RoI classification and class-agnostic box regression from one feature map.

    Args:
        in_feature: the map to use (default: the one with the largest stride <= 16, else the
            coarsest; R-FCN uses dilated C5 at stride 16).
        reduced_channels: D, the 1x1 reduction (1024 in the paper).
        group_size: k (7 in the paper's ResNet-101 experiments).
        align: bilinear PS-RoIAlign (``torchvision.ops.ps_roi_align``) instead of the paper's
            PS-RoI average pooling (``ps_roi_avg_pool``, which reads whole cells).
        ohem / ohem_batch_size / ohem_nms_thresh: online hard example mining (see module doc).
        Other keyword arguments: RoI assignment / sampling / post-processing (``RoIHeadBase``).
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 in_feature: str | None = None, reduced_channels: int = 1024, group_size: int = 7,
                 align: bool = False, sampling_ratio: int = 2, ohem: bool = False,
                 ohem_batch_size: int = 128, ohem_nms_thresh: float = 0.7, **roi_kwargs):
        super().__init__(num_classes=num_classes, class_agnostic_box=True, **roi_kwargs)
        self.in_feature = in_feature or _default_feature(input_shapes)
        if self.in_feature not in input_shapes:
            raise ValueError(f"in_feature '{self.in_feature}' is not among the input feature maps "
                             f"{sorted(input_shapes)}")
        spec = input_shapes[self.in_feature]
        self.stride, self.group_size, self.align = spec.stride, group_size, align
        self.sampling_ratio = sampling_ratio
        self.ohem, self.ohem_batch_size, self.ohem_nms_thresh = ohem, ohem_batch_size, ohem_nms_thresh
        if ohem:  # every proposal is scored; the hardest are chosen in the loss
            self.batch_size_per_image, self.positive_fraction = 1 << 30, 1.0
        k2 = group_size * group_size
        self.reduce = nn.Conv2d(spec.channels, reduced_channels, 1)
        self.cls_maps = nn.Conv2d(reduced_channels, k2 * (num_classes + 1), 1)
        self.box_maps = nn.Conv2d(reduced_channels, k2 * 4, 1)
        for conv in (self.reduce, self.cls_maps, self.box_maps):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(cast(Tensor, conv.bias))

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> dict:
        """-> ``class_logits`` Float[R, C+1], ``box_deltas`` Float[R, 4], ``proposals``."""
        x = F.relu(self.reduce(features[self.in_feature]))
        rois = [p.to(x.dtype) for p in proposals]
        args = (self.group_size, 1.0 / self.stride, self.align, self.sampling_ratio)
        return {"class_logits": position_sensitive_vote(self.cls_maps(x), rois, *args),
                "box_deltas": position_sensitive_vote(self.box_maps(x), rois, *args),
                "proposals": proposals}

    def loss(self, outputs: dict, samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not self.ohem:
            return super().loss(outputs, samples)
        keep = self._hard_examples(outputs, samples)
        counts = [s["labels"].numel() for s in samples]
        picked, start = [], 0
        for n in counts:
            picked.append(keep[(keep >= start) & (keep < start + n)] - start)
            start += n
        outputs = {"class_logits": outputs["class_logits"][keep], "box_deltas": outputs["box_deltas"][keep],
                   "proposals": [p[i] for p, i in zip(outputs["proposals"], picked)]}
        samples = [{k: v[i] for k, v in s.items()} for s, i in zip(samples, picked)]
        return super().loss(outputs, samples)

    @torch.no_grad()
    def _hard_examples(self, outputs: dict, samples: list[dict[str, Tensor]]) -> Tensor:
        """Indices (into the batch's RoIs) of the ``ohem_batch_size`` highest-loss RoIs per image."""
        per_roi = self.per_roi_loss(outputs, samples)
        keep, start = [], 0
        for boxes in outputs["proposals"]:
            n = boxes.shape[0]
            losses = per_roi[start: start + n]
            order = nms(boxes.float(), losses, self.ohem_nms_thresh)[: self.ohem_batch_size]
            keep.append(order + start)
            start += n
        return torch.cat(keep) if keep else per_roi.new_zeros(0, dtype=torch.int64)


def _default_feature(input_shapes: dict[str, ShapeSpec]) -> str:
    fine = [k for k in input_shapes if input_shapes[k].stride <= 16]
    pool = fine or list(input_shapes)
    return max(pool, key=lambda k: input_shapes[k].stride)

