"""D-FINE's Fine-grained Distribution Refinement (FDR).

Legend: B images, Q queries, D channels, R = reg_max (R + 1 bins per edge), L layers, C classes.
Boxes are cxcywh normalised to the padded input. A box is predicted as four edge distributions
(left, top, right, bottom) over R + 1 bins; the bins' values W(n) come from the non-uniform
weighting function (fine near 0, coarse at the ends up to +-2 * up * reg_scale). Every layer adds
its logits to the previous layer's (the residual "refinement of distributions"); the edges are
measured from the initial boxes of the pre-bbox head in units of ``box size / reg_scale``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .decoder import MLP, DecoderLayer, zero_last_layer
from .position import inverse_sigmoid, xyxy_to_cxcywh

__all__ = ["weighting_function", "distribution_integral", "distance_to_box", "LocationQuality",
           "FDRDecoder"]


def weighting_function(reg_max: int, up: Tensor, reg_scale: Tensor) -> Tensor:
    """Float[R+1] bin values W(n): ``-2a, 1 - s^(R/2-1) .. 1 - s, 0, s - 1 .. s^(R/2-1) - 1, 2a``
    with ``a = |up * reg_scale|`` and ``s = (a + 1) ** (2 / (R - 2))``; up, reg_scale Float[1]."""
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max must be an even number >= 4, got {reg_max}")
    bound = (up.abs() * reg_scale.abs()).reshape(1)
    step = (bound + 1) ** (2.0 / (reg_max - 2))
    exponents = torch.arange(1, reg_max // 2, device=bound.device, dtype=bound.dtype)
    right = step ** exponents - 1
    return torch.cat([-2 * bound, -right.flip(0), bound.new_zeros(1), right, 2 * bound])


def distribution_integral(corner_logits: Tensor, project: Tensor) -> Tensor:
    """corner_logits Float[B,Q,4*(R+1)] -> expected edge distances Float[B,Q,4] = sum softmax * W."""
    batch, queries, _ = corner_logits.shape
    probs = corner_logits.reshape(batch, queries, 4, -1).softmax(-1)
    return probs @ project.to(probs.dtype)


def distance_to_box(points: Tensor, distance: Tensor, reg_scale: Tensor) -> Tensor:
    """points Float[...,4] cxcywh, distance Float[...,4] (l, t, r, b) in units of size / reg_scale,
    offset by half a box -> Float[...,4] cxcywh."""
    scale = reg_scale.abs()
    center, size = points[..., :2], points[..., 2:]
    half = (0.5 * scale + distance) * torch.cat([size, size], -1) / scale
    low, high = center - half[..., :2], center + half[..., 2:]
    return xyxy_to_cxcywh(torch.cat([low, high], -1))


class LocationQuality(nn.Module):
    """LQE: adds to the class logits a score from the top-k probabilities of each edge
    distribution and their mean (a peaked distribution means a well-located box)."""

    def __init__(self, *, top_k: int = 4, hidden_dim: int = 64, num_layers: int = 2):
        super().__init__()
        self.top_k = top_k
        self.mlp = MLP(in_dim=4 * (top_k + 1), hidden_dim=hidden_dim, out_dim=1, num_layers=num_layers)
        zero_last_layer(self.mlp)

    def forward(self, logits: Tensor, corner_logits: Tensor) -> Tensor:
        """logits Float[B,Q,C], corner_logits Float[B,Q,4*(R+1)] -> Float[B,Q,C]."""
        batch, queries, _ = corner_logits.shape
        probs = corner_logits.reshape(batch, queries, 4, -1).softmax(-1)
        top = probs.topk(self.top_k, dim=-1).values
        stats = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(batch, queries, -1)
        return logits + self.mlp(stats)


class FDRDecoder(nn.Module):
    """D-FINE's decoder: gated decoder layers, a pre-bbox head giving the initial boxes after layer
    0, and per-layer residual edge distributions decoded against those initial boxes.

    ``reg_scale`` and ``up`` are buffers (fixed hyper-parameters kept with the weights, as in D-FINE).
    """

    reg_scale: Tensor
    up: Tensor

    def __init__(self, *, layers: Sequence[DecoderLayer], embed_dim: int, num_classes: int,
                 reg_max: int = 32, reg_scale: float = 4.0, up: float = 0.5, lqe_top_k: int = 4,
                 lqe_hidden_dim: int = 64, lqe_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.reg_max = reg_max
        self.query_pos_head = MLP(in_dim=4, hidden_dim=2 * embed_dim, out_dim=embed_dim, num_layers=2)
        self.pre_box_head = MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4, num_layers=3)
        self.class_heads = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in layers)
        self.box_heads = nn.ModuleList(
            MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4 * (reg_max + 1), num_layers=3)
            for _ in layers)
        self.quality = nn.ModuleList(
            LocationQuality(top_k=lqe_top_k, hidden_dim=lqe_hidden_dim, num_layers=lqe_layers)
            for _ in layers)
        self.register_buffer("reg_scale", torch.tensor([float(reg_scale)]))
        self.register_buffer("up", torch.tensor([float(up)]))
        for head in self.box_heads:
            zero_last_layer(head)

    def forward(self, x: Tensor, reference_logits: Tensor, memory: Tensor,
                spatial_shapes: Sequence[tuple[int, int]],
                attn_mask: Tensor | None = None) -> tuple[list[dict], dict]:
        """x Float[B,Q,D], reference_logits Float[B,Q,4] (detached) -> (per-layer dicts with
        ``logits`` Float[B,Q,C] (LQE added), ``boxes``, ``corners`` Float[B,Q,4(R+1)],
        ``ref_points`` (the initial boxes), and the pre-bbox head's ``{logits, boxes}``)."""
        project = weighting_function(self.reg_max, self.up, self.reg_scale)
        ref_detached = reference_logits.sigmoid()
        x_detached: Tensor | float = 0.0
        corners_prev: Tensor | float = 0.0
        outputs: list[dict] = []
        pre: dict = {}
        for i, layer in enumerate(self.layers):
            pos = self.query_pos_head(ref_detached).clamp(-10, 10)
            x = layer(x, pos, ref_detached, memory, spatial_shapes, attn_mask)
            if i == 0:
                pre_boxes = torch.sigmoid(self.pre_box_head(x) + inverse_sigmoid(ref_detached))
                pre = {"logits": self.class_heads[0](x), "boxes": pre_boxes}
                initial = pre_boxes.detach()
            corners = self.box_heads[i](x + x_detached) + corners_prev
            boxes = distance_to_box(initial, distribution_integral(corners, project), self.reg_scale)
            logits = self.quality[i](self.class_heads[i](x), corners)
            outputs.append({"logits": logits, "boxes": boxes, "corners": corners, "ref_points": initial})
            corners_prev, ref_detached, x_detached = corners, boxes.detach(), x.detach()
        return outputs, pre
