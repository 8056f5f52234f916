"""From encoder feature maps to decoder inputs: level projections, anchors, top-k query selection.

Legend: B images, L levels of Hl x Wl, S = sum_l Hl*Wl, D channels, C classes, K queries.
Boxes are cxcywh normalised to the padded input; box logits are their inverse sigmoid.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor, nn

from .decoder import MLP, zero_last_layer

__all__ = ["LevelProjection", "make_anchors", "QuerySelection", "flatten_levels", "select_levels"]


class LevelProjection(nn.Module):
    """Per level: conv1x1 + BN to D channels (or identity when ``identity_if_equal`` and the level
    already has D channels, as D-FINE); then ``num_levels - len(in_channels)`` extra levels, each a
    3x3 stride-2 conv + BN of the previous one (D-FINE: identity when the channels already match)."""

    def __init__(self, *, in_channels: Sequence[int], embed_dim: int, num_levels: int,
                 identity_if_equal: bool = False, batch_norm_eps: float = 1e-5):
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(f"num_levels {num_levels} is smaller than the {len(in_channels)} input levels")

        def block(cin: int, kernel: int, stride: int) -> nn.Module:
            if identity_if_equal and cin == embed_dim:
                return nn.Identity()
            return nn.Sequential(OrderedDict(
                conv=nn.Conv2d(cin, embed_dim, kernel, stride, padding=kernel // 2, bias=False),
                norm=nn.BatchNorm2d(embed_dim, eps=batch_norm_eps)))

        projections = [block(c, 1, 1) for c in in_channels]
        channels = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projections.append(block(channels, 3, 2))
            channels = embed_dim
        self.projections = nn.ModuleList(projections)
        self.num_inputs = len(in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """[Float[B,Ci,Hl,Wl]] * len(in_channels) -> [Float[B,D,Hl,Wl]] * num_levels."""
        levels = [proj(f) for proj, f in zip(self.projections, features)]
        source = features[-1]
        for proj in self.projections[self.num_inputs:]:
            source = proj(source)
            levels.append(source)
        return levels


def select_levels(input_shapes: dict, in_features: Sequence[str] | None) -> list[str]:
    """The neck levels a DETR head reads: ``in_features`` in its order, or all by stride."""
    names = (list(in_features) if in_features is not None
             else sorted(input_shapes, key=lambda n: input_shapes[n].stride))
    missing = [n for n in names if n not in input_shapes]
    if missing:
        raise ValueError(f"in_features {missing} are not among the inputs {sorted(input_shapes)}")
    return names


def flatten_levels(levels: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """[Float[B,D,Hl,Wl]] -> (memory Float[B,S,D], [(Hl, Wl)]); the sizes are ints, or traced
    sizes while tracing for export (so that the graph follows the input size)."""
    if torch.jit.is_tracing():
        shapes = [(x.shape[-2], x.shape[-1]) for x in levels]
    else:
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in levels]
    return torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1), shapes


@lru_cache(maxsize=32)
def _anchors_cached(shapes: tuple[tuple[int, int], ...], grid_size: float, eps: float,
                    device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    per_level = []
    for level, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                                torch.arange(w, device=device, dtype=dtype), indexing="ij")
        centers = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)
        sizes = torch.full_like(centers, grid_size * 2.0 ** level)
        per_level.append(torch.cat([centers, sizes], -1))
    anchors = torch.cat(per_level)[None]
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    logits = torch.log(anchors / (1 - anchors))
    # Invalid anchors (touching the border) get the largest finite logit: their boxes decode to
    # the whole image edge, as in RT-DETR, without producing NaNs downstream.
    logits = torch.where(valid, logits, torch.full_like(logits, torch.finfo(dtype).max))
    return logits, valid


def make_anchors(shapes: Sequence[tuple[int, int]], *, grid_size: float = 0.05, eps: float = 0.01,
                 device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """One anchor per memory position: its pixel centre and a size ``grid_size * 2**level``.
    Returns (box logits Float[1,S,4], valid Bool[1,S,1]). Cached per shapes: a training run sees
    few distinct input sizes."""
    where = torch.device(device or "cpu")
    if torch.jit.is_tracing():   # no cache: traced sizes keep the anchors following the input
        return _anchors_cached.__wrapped__(tuple(shapes), grid_size, eps, where, dtype)
    return _anchors_cached(tuple((int(h), int(w)) for h, w in shapes), grid_size, eps, where, dtype)


class QuerySelection(nn.Module):
    """RT-DETR's two-stage query selection: score every memory position as a proposal (a box
    relative to its anchor), keep the K best by their top class score.

    Returns ``queries`` Float[B,K,D] (the selected memory features, detached), ``box_logits``
    Float[B,K,4] (undetached, for the encoder loss), ``logits`` Float[B,K,C], ``boxes`` Float[B,K,4].
    """

    box_head: MLP

    def __init__(self, *, embed_dim: int, num_classes: int, num_queries: int,
                 layer_norm_eps: float = 1e-5, anchor_grid_size: float = 0.05):
        super().__init__()
        self.num_queries, self.anchor_grid_size = num_queries, anchor_grid_size
        self.memory_proj = nn.Sequential(OrderedDict(
            linear=nn.Linear(embed_dim, embed_dim), norm=nn.LayerNorm(embed_dim, eps=layer_norm_eps)))
        self.score_head = nn.Linear(embed_dim, num_classes)
        self.box_head = MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4, num_layers=3)
        zero_last_layer(self.box_head)

    def forward(self, memory: Tensor, shapes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        anchor_logits, valid = make_anchors(shapes, grid_size=self.anchor_grid_size, device=memory.device,
                                            dtype=memory.dtype)
        features = self.memory_proj(valid.to(memory.dtype) * memory)
        class_logits = self.score_head(features)
        box_logits = self.box_head(features) + anchor_logits
        k = self.num_queries if torch.jit.is_tracing() else min(self.num_queries, memory.shape[1])
        index = class_logits.max(-1).values.topk(k, dim=1).indices[..., None]
        topk_box_logits = box_logits.gather(1, index.expand(-1, -1, 4))
        return {"queries": features.gather(1, index.expand(-1, -1, features.shape[-1])).detach(),
                "box_logits": topk_box_logits,
                "logits": class_logits.gather(1, index.expand(-1, -1, class_logits.shape[-1])),
                "boxes": topk_box_logits.sigmoid()}
