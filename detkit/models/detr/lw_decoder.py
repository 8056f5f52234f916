"""LW-DETR / RF-DETR decoder parts: group query selection, group self-attention, the decoder.

Legend: B images, G query groups (Group DETR; G in training, 1 at evaluation), Q queries per group,
K = min(Q, S) selected per group, S = sum_l Hl*Wl flattened memory positions, D channels,
C classes. Boxes are cxcywh normalised to the padded input and, unlike RT-DETR, are refined in box
space (not logit space): ``cxcy = d_xy * r_wh + r_xy``, ``wh = exp(d_wh) * r_wh``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .decoder import MLP, DecoderLayer, SelfAttention, zero_last_layer

__all__ = ["refine_boxes", "box_sine_embedding", "grid_proposals", "GroupSelfAttention",
           "GroupQuerySelection", "LWDETRDecoder"]


def refine_boxes(reference: Tensor, deltas: Tensor) -> Tensor:
    """reference Float[...,4] cxcywh, deltas Float[...,4] -> Float[...,4] cxcywh: the centre moves by
    ``d_xy`` reference sizes, the size scales by ``exp(d_wh)``."""
    return torch.cat([deltas[..., :2] * reference[..., 2:] + reference[..., :2],
                      deltas[..., 2:].exp() * reference[..., 2:]], -1)


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Float[...,4] cxcywh in [0, 1] -> Float[..., 4 * num_feats], laid out per coordinate in the
    order (cy, cx, w, h) (DETR's y-first convention), each ``[sin f0, cos f0, sin f1, cos f1, ...]``
    of ``coord * 2 pi / temperature ** (2k / num_feats)``."""
    if num_feats % 2:
        raise ValueError(f"box sine embedding: num_feats {num_feats} is not even")
    index = torch.arange(num_feats // 2, dtype=torch.float32, device=boxes.device)
    freqs = temperature ** (2 * index / num_feats)                    # Float[F/2]
    angles = boxes.float()[..., None] * (2 * math.pi) / freqs          # Float[...,4,F/2]
    per_coord = torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)   # Float[...,4,F]
    cy_cx_w_h = per_coord[..., [1, 0, 2, 3], :]
    return cy_cx_w_h.flatten(-2).to(boxes.dtype)


def grid_proposals(shapes: Sequence[tuple[int, int]], *, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32, eps: float = 0.01) -> tuple[Tensor, Tensor]:
    """One proposal per memory position: its pixel centre and size ``0.05 * 2**level``.
    Returns (boxes Float[1,S,4] cxcywh, zero where invalid; valid Bool[1,S,1], all four
    coordinates inside (eps, 1 - eps))."""
    per_level = []
    for level, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                                torch.arange(w, device=device, dtype=dtype), indexing="ij")
        centers = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)
        per_level.append(torch.cat([centers, torch.full_like(centers, 0.05 * 2.0 ** level)], -1))
    boxes = torch.cat(per_level)[None]
    valid = ((boxes > eps) & (boxes < 1 - eps)).all(-1, keepdim=True)
    return boxes * valid.to(dtype), valid


class GroupSelfAttention(SelfAttention):
    """Self-attention in which, in training, the queries form ``num_groups`` equal consecutive
    groups that attend only within their group (Group DETR); at evaluation all queries (one
    group) attend to each other. The groups are folded into the batch, not masked."""

    def __init__(self, *, embed_dim: int, num_heads: int, num_groups: int = 1, dropout: float = 0.0):
        super().__init__(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.num_groups = int(num_groups)

    def forward(self, x: Tensor, pos: Tensor | None, attn_mask: Tensor | None = None) -> Tensor:
        groups = self.num_groups if self.training else 1
        if groups == 1:
            return super().forward(x, pos, attn_mask)
        batch, queries, dim = x.shape
        if queries % groups:
            raise ValueError(f"{queries} queries do not split into {groups} groups")

        def fold(t: Tensor) -> Tensor:          # Float[B,G*K,D] -> Float[B*G,K,D]
            return t.reshape(batch * groups, queries // groups, dim)

        out = super().forward(fold(x), None if pos is None else fold(pos), attn_mask)
        return out.reshape(batch, queries, dim)


class GroupQuerySelection(nn.Module):
    """Two-stage query selection with one set of encoder heads per group: per group g a Linear +
    LayerNorm of the memory, a class head and a box-delta MLP on top of the grid proposals, and
    the top-K positions by their best class logit (invalid positions never win unless K > valid).

    ``forward(memory, shapes, num_groups)`` returns, groups concatenated along the query axis
    (Float[B,G*K,...]): ``boxes`` (undetached, for the encoder loss) and ``logits`` of the
    selected positions (finite: recomputed from the selected features)."""

    def __init__(self, *, embed_dim: int, num_classes: int, num_queries: int, num_groups: int,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.num_queries = num_queries
        self.enc_output = nn.ModuleList(nn.Linear(embed_dim, embed_dim) for _ in range(num_groups))
        self.enc_output_norm = nn.ModuleList(nn.LayerNorm(embed_dim, eps=layer_norm_eps)
                                             for _ in range(num_groups))
        self.score_heads = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(num_groups))
        self.box_heads = nn.ModuleList(MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4, num_layers=3)
                                       for _ in range(num_groups))
        for head in self.box_heads:
            zero_last_layer(head)

    def forward(self, memory: Tensor, shapes: Sequence[tuple[int, int]],
                num_groups: int) -> dict[str, Tensor]:
        proposals, valid = grid_proposals(shapes, device=memory.device, dtype=memory.dtype)
        memory = memory * valid.to(memory.dtype)
        k = self.num_queries if torch.jit.is_tracing() else min(self.num_queries, memory.shape[1])
        boxes, logits = [], []
        for g in range(num_groups):
            features = self.enc_output_norm[g](self.enc_output[g](memory))
            scores = self.score_heads[g](features).masked_fill(~valid, float("-inf")).max(-1).values
            index = scores.topk(k, dim=1).indices[..., None]             # Int64[B,K,1]
            picked = features.gather(1, index.expand(-1, -1, features.shape[-1]))
            deltas = self.box_heads[g](picked)
            boxes.append(refine_boxes(proposals.expand(memory.shape[0], -1, -1).gather(
                1, index.expand(-1, -1, 4)), deltas))
            logits.append(self.score_heads[g](picked))
        return {"boxes": torch.cat(boxes, 1), "logits": torch.cat(logits, 1)}


class LWDETRDecoder(nn.Module):
    """LW-DETR's decoder: the reference boxes are fixed for all layers ("lite refpoint refine"),
    so their position embedding (``ref_point_head`` of the box sine embedding) is computed once;
    every layer's output goes through the shared final norm and the shared class / box heads, and
    each layer's boxes refine the same reference (no per-layer update, nothing detached)."""

    def __init__(self, *, layers: Sequence[DecoderLayer], embed_dim: int, num_classes: int,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.ref_point_head = MLP(in_dim=2 * embed_dim, hidden_dim=embed_dim, out_dim=embed_dim, num_layers=2)
        self.class_head = nn.Linear(embed_dim, num_classes)
        self.box_head = MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4, num_layers=3)
        zero_last_layer(self.box_head)

    def forward(self, x: Tensor, reference: Tensor, memory: Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """x Float[B,N,D] queries, reference Float[B,N,4] cxcywh -> per-layer logits
        [Float[B,N,C]] * L and boxes [Float[B,N,4]] * L."""
        pos = self.ref_point_head(box_sine_embedding(reference, self.embed_dim // 2))
        all_logits, all_boxes = [], []
        for layer in self.layers:
            x = layer(x, pos, reference, memory, spatial_shapes)
            hidden = self.norm(x)
            all_logits.append(self.class_head(hidden))
            all_boxes.append(refine_boxes(reference, self.box_head(hidden)))
        return all_logits, all_boxes
