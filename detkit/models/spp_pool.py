"""SPP-net spatial pyramid pooling (He et al., ECCV 2014): fixed-length vectors from any size.

Legend: B images, C channels, K RoIs, L = sum(b * b for b in bins) bins in total.

A feature map (or each RoI on it) is max-pooled into b x b bins for every pyramid level b and the
results are flattened and concatenated: C x L values whatever the input size, which is what let
SPP-net feed arbitrary-sized images (and arbitrary RoIs) into fully connected layers. Bin
boundaries are floor(i * H / b) .. ceil((i + 1) * H / b), the paper's windows, which is exactly
``adaptive_max_pool2d`` for whole maps and ``torchvision.ops.roi_pool`` for RoIs (Fast R-CNN's
RoI pooling is the one-level case of SPP).

``SPPRoIPool`` has the call signature of ``torchvision.ops.MultiScaleRoIAlign``
(``features, proposals, image_sizes``) so it can replace it as a two-stage detector's RoI feature
extractor; on an FPN each RoI is pooled from one level chosen by the FPN paper's rule
``k = floor(k0 + log2(sqrt(w * h) / 224))``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

from ..registry import ROI_POOLERS

__all__ = ["SpatialPyramidPool", "SPPRoIPool", "fpn_level_of_boxes"]


class SpatialPyramidPool(nn.Module):
    """Float[B,C,H,W] -> Float[B, C * L]: max-pool into each b x b grid, flatten, concatenate."""

    def __init__(self, *, bins: Sequence[int] = (1, 2, 4)):
        super().__init__()
        if not bins or any(int(b) < 1 for b in bins):
            raise ValueError(f"SPP bins must be positive integers, got {list(bins)}")
        self.bins = [int(b) for b in bins]

    def output_dim(self, channels: int) -> int:
        return channels * sum(b * b for b in self.bins)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in self.bins], dim=1)


def fpn_level_of_boxes(boxes: Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                       canonical_level: int = 4) -> Tensor:
    """FPN paper eq. 1: Int64[K] level in [min_level, max_level] for Float[K,4] xyxy boxes."""
    size = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-6))
    return level.clamp(min_level, max_level).to(torch.int64)


@ROI_POOLERS.register()
class SPPRoIPool(nn.Module):
    """Pool each RoI into every b x b grid of ``bins``: -> Float[K, C * L, 1, 1], ordered like the
    input (a fixed-length vector per RoI, shaped as a 1 x 1 map so any box head can consume it).

    ``featmap_names`` are the feature levels to pool from and ``strides`` their strides in input
    pixels (``ShapeSpec.stride``; ``RoIHead`` passes them from the config, as ``make_pooler`` does
    for RoIAlign). Guessing a level's scale from ``feature size / image size`` goes wrong on
    small padded images (a 40 px image padded to 64 has a 16 px p2: every level would get twice
    its scale and the FPN rule would pick a level one too coarse).
    """

    def __init__(self, *, featmap_names: Sequence[str], strides: Sequence[int],
                 bins: Sequence[int] = (1, 2, 4), canonical_scale: float = 224.0,
                 canonical_level: int = 4):
        super().__init__()
        self.featmap_names = list(featmap_names)
        if len(strides) != len(self.featmap_names):
            raise ValueError(f"SPPRoIPool: {len(strides)} strides for {len(self.featmap_names)} "
                             f"feature maps {self.featmap_names}")
        levels = [math.log2(s) for s in strides]
        if len(levels) > 1 and (any(lv != round(lv) for lv in levels)
                                or any(b - a != 1 for a, b in zip(levels, levels[1:]))):
            raise ValueError(f"SPPRoIPool: the FPN level rule needs strides that are consecutive "
                             f"powers of two, got {list(strides)} for {self.featmap_names}")
        self.scales = [1.0 / s for s in strides]
        self.levels = [round(lv) for lv in levels]
        self.spp = SpatialPyramidPool(bins=bins)
        self.bins = self.spp.bins
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level

    def output_dim(self, channels: int) -> int:
        return self.spp.output_dim(channels)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> Tensor:
        """Float[B,C,Hl,Wl] maps, Float[K_b,4] xyxy RoIs per image -> Float[K, C * L, 1, 1].

        ``image_sizes`` is not needed (the strides are known); it keeps MultiScaleRoIAlign's call.
        """
        feats = [features[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        channels = feats[0].shape[1]
        out = rois.new_zeros(rois.shape[0], self.output_dim(channels), dtype=feats[0].dtype)
        if len(feats) == 1:
            return self._pool(feats[0], rois, self.scales[0])[:, :, None, None]
        assigned = fpn_level_of_boxes(rois[:, 1:], self.levels[0], self.levels[-1],
                                      self.canonical_scale, self.canonical_level)
        for feat, scale, level in zip(feats, self.scales, self.levels):
            idx = torch.where(assigned == level)[0]
            if idx.numel():
                out[idx] = self._pool(feat, rois[idx], scale)
        return out[:, :, None, None]

    def _pool(self, feat: Tensor, rois: Tensor, scale: float) -> Tensor:
        return torch.cat([roi_pool(feat, rois, output_size=b, spatial_scale=scale).flatten(1)
                          for b in self.bins], dim=1)
