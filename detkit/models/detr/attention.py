"""Multi-scale deformable attention (Deformable DETR, RT-DETR v1/v2, D-FINE) in pure PyTorch.

Legend: B images, Q queries, S = sum_l Hl*Wl flattened memory positions, L levels, M heads,
Dh channels per head, P = sum_l Pl sampling points of one head over all levels (RT-DETRv2 and
D-FINE may give each level its own point count Pl). Sampling locations are normalised to the
level's map: (0, 0) is the top-left corner of the top-left pixel, (1, 1) the bottom-right corner
of the bottom-right pixel (``grid_sample``'s ``align_corners=False`` convention).

Two interchangeable samplers compute the same bilinear interpolation with zero padding:
``grid_sample`` (fast in eager PyTorch) and a gather of the four neighbours (exportable: TensorRT
mis-computes ``grid_sample`` inside these graphs, NVIDIA/TensorRT #4813). The "discrete" method
of RT-DETRv2 takes the nearest pixel instead (clamped to the map), always by gather.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformableAttention", "deformable_sampling", "SAMPLING_METHODS"]

SAMPLING_METHODS = ("default", "discrete")


def _gather_pixels(value: Tensor, x: Tensor, y: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """value Float[BM,Dh,H*W]; x, y Int64[BM,K] pixel indices -> (Float[BM,Dh,K], inside Bool[BM,K])."""
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    index = y.clamp(0, height - 1) * width + x.clamp(0, width - 1)
    picked = value.gather(2, index[:, None, :].expand(-1, value.shape[1], -1))
    return picked, inside


def _bilinear_by_gather(value: Tensor, loc: Tensor, height: int, width: int) -> Tensor:
    """value Float[BM,Dh,H*W], loc Float[BM,K,2] (x, y in [0, 1]) -> Float[BM,Dh,K]; equals
    ``grid_sample(bilinear, zeros, align_corners=False)``. ``height`` / ``width`` may be traced
    sizes (exported graphs then follow the input size)."""
    x = loc[..., 0] * width - 0.5
    y = loc[..., 1] * height - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0l, y0l = x0.long(), y0.long()
    out = value.new_zeros(value.shape[0], value.shape[1], loc.shape[1])
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        picked, inside = _gather_pixels(value, x0l + dx, y0l + dy, width, height)
        out = out + picked * (weight * inside.to(weight.dtype))[:, None, :]
    return out


def _nearest_by_gather(value: Tensor, loc: Tensor, height: int, width: int) -> Tensor:
    """RT-DETRv2's "discrete" sampling: the pixel ``floor(loc * size + 0.5)`` clamped into the map."""
    x = (loc[..., 0] * width + 0.5).floor().long().clamp(0, width - 1)
    y = (loc[..., 1] * height + 0.5).floor().long().clamp(0, height - 1)
    picked, _ = _gather_pixels(value, x, y, width, height)
    return picked


def deformable_sampling(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], locations: Tensor,
                        weights: Tensor, points_per_level: Sequence[int], *, method: str = "default",
                        exportable: bool = False) -> Tensor:
    """The attention core: sample every level at its points and sum with the attention weights.

    value Float[B,S,M,Dh]; locations Float[B,Q,M,P,2] (x, y normalised per level); weights
    Float[B,Q,M,P] (already softmaxed); ``points_per_level`` [P1..PL] sums to P.
    Returns Float[B,Q,M*Dh].
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"sampling method '{method}' is not one of {SAMPLING_METHODS}")
    batch, _, heads, head_dim = value.shape
    queries = locations.shape[1]
    flat_value = value.permute(0, 2, 3, 1).flatten(0, 1)              # Float[BM,Dh,S]
    per_level_values, start = [], 0
    for h, w in spatial_shapes:   # slices, not split(): sizes stay symbolic when traced for export
        per_level_values.append(flat_value[..., start:start + h * w])
        start = start + h * w
    per_level_locs = locations.transpose(1, 2).flatten(0, 1).split(list(points_per_level), dim=2)
    sampled = []
    for (h, w), level_value, level_loc in zip(spatial_shapes, per_level_values, per_level_locs):
        points = level_loc.shape[2]                                  # level_loc Float[BM,Q,Pl,2]
        if method == "discrete":
            s = _nearest_by_gather(level_value, level_loc.flatten(1, 2), h, w)
        elif exportable:
            s = _bilinear_by_gather(level_value, level_loc.flatten(1, 2), h, w)
        else:
            grid = 2 * level_loc - 1
            s = F.grid_sample(level_value.reshape(batch * heads, head_dim, h, w), grid, mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        sampled.append(s.reshape(batch * heads, head_dim, queries, points))
    w_flat = weights.transpose(1, 2).reshape(batch * heads, 1, queries, -1)
    out = (torch.cat(sampled, dim=-1) * w_flat).sum(-1)             # Float[BM,Dh,Q]
    return out.reshape(batch, heads * head_dim, queries).transpose(1, 2)


class MSDeformableAttention(nn.Module):
    """Deformable cross-attention from object queries to a flattened multi-level memory.

    Each head predicts, from the query, ``Pl`` offsets per level around the query's reference box
    and one weight per point (softmax over all P points of the head). An offset ``o`` moves the
    point to ``center + o / Pl * wh * offset_scale`` (RT-DETR v1 is ``offset_scale`` 0.5 with the
    same Pl on every level).

    Args:
        embed_dim: D, query and memory channels.
        num_heads: M.
        num_levels: L.
        num_points: Pl, one int for every level or one per level.
        offset_scale: scale of the offsets relative to the reference box size.
        method: "default" (bilinear) or "discrete" (nearest pixel, RT-DETRv2).
        value_proj / output_proj: the linear maps around the core (D-FINE has neither).
        exportable: bilinear by gather instead of ``grid_sample`` (same numbers).
    """

    point_scale: Tensor

    def __init__(self, *, embed_dim: int, num_heads: int, num_levels: int,
                 num_points: int | Sequence[int] = 4, offset_scale: float = 0.5,
                 method: str = "default", value_proj: bool = True, output_proj: bool = True,
                 exportable: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if method not in SAMPLING_METHODS:
            raise ValueError(f"method '{method}' is not one of {SAMPLING_METHODS}")
        points = ([int(num_points)] * num_levels if isinstance(num_points, int)
                  else [int(p) for p in num_points])
        if len(points) != num_levels or min(points) < 1:
            raise ValueError(f"num_points {num_points} needs {num_levels} positive counts (one per level)")
        self.embed_dim, self.num_heads, self.num_levels = embed_dim, num_heads, num_levels
        self.points_per_level = points
        self.offset_scale, self.method, self.exportable = float(offset_scale), method, exportable
        total = num_heads * sum(points)
        self.sampling_offsets = nn.Linear(embed_dim, total * 2)
        self.attention_weights = nn.Linear(embed_dim, total)
        self.value_proj = nn.Linear(embed_dim, embed_dim) if value_proj else None
        self.output_proj = nn.Linear(embed_dim, embed_dim) if output_proj else None
        self.register_buffer("point_scale", torch.tensor([1.0 / p for p in points for _ in range(p)]),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights, biases on a star of growing radii."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * torch.pi / self.num_heads)
        star = torch.stack([angles.cos(), angles.sin()], -1)
        star = star / star.abs().max(-1, keepdim=True).values
        radii = torch.cat([torch.arange(1, p + 1) for p in self.points_per_level]).float()
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((star[:, None, :] * radii[None, :, None]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_boxes: Tensor, memory: Tensor,
                spatial_shapes: Sequence[tuple[int, int]], memory_mask: Tensor | None = None) -> Tensor:
        """query Float[B,Q,D] (position already added), reference_boxes Float[B,Q,4] cxcywh in
        [0, 1], memory Float[B,S,D], memory_mask Bool[B,S] (True = valid) -> Float[B,Q,D]."""
        batch, queries, _ = query.shape
        value = self.value_proj(memory) if self.value_proj is not None else memory
        if memory_mask is not None:
            value = value.masked_fill(~memory_mask[..., None], 0.0)
        value = value.reshape(batch, value.shape[1], self.num_heads, -1)
        offsets = self.sampling_offsets(query).reshape(batch, queries, self.num_heads, -1, 2)
        weights = self.attention_weights(query).reshape(batch, queries, self.num_heads, -1).softmax(-1)
        scale = self.point_scale.to(query.dtype)[:, None] * self.offset_scale
        boxes = reference_boxes[:, :, None, None, :]
        locations = boxes[..., :2] + offsets * scale * boxes[..., 2:]
        out = deformable_sampling(value, spatial_shapes, locations, weights, self.points_per_level,
                                  method=self.method, exportable=self.exportable)
        return self.output_proj(out) if self.output_proj is not None else out
