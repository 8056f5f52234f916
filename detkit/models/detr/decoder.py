"""Decoder layers of the real-time DETRs and RT-DETR's iterative box refinement.

Legend: B images, Q queries (denoising + matching), D channels, S flattened memory positions,
L decoder layers, C classes. Boxes are cxcywh normalised to the padded input; "box logits" are
their inverse sigmoid. Layers are post-norm as in RT-DETR (norm after each residual sum).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MSDeformableAttention
from .position import inverse_sigmoid

__all__ = ["MLP", "SelfAttention", "Gate", "DecoderLayer", "RTDETRDecoder", "activation_layer",
           "zero_last_layer"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def activation_layer(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation '{name}' is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """``num_layers`` Linear layers with an activation between them (none after the last)."""

    layers: nn.ModuleList

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int,
                 activation: str = "relu"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation_layer(activation)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


def zero_last_layer(mlp: nn.Module) -> None:
    """Zero the last Linear of an :class:`MLP` (box heads start by predicting no change)."""
    last = [m for m in mlp.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention among the queries; the position is added to queries and keys
    only. ``attn_mask`` Float[Q,Q] is added to the logits (``-inf`` blocks a pair)."""

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, pos: Tensor | None, attn_mask: Tensor | None = None) -> Tensor:
        batch, queries, dim = x.shape
        qk_in = x if pos is None else x + pos

        def heads(t: Tensor) -> Tensor:
            return t.reshape(batch, queries, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(qk_in)), heads(self.k_proj(qk_in)), heads(self.v_proj(x))
        if attn_mask is not None:      # under autocast the queries may be half precision
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, queries, dim))


class Gate(nn.Module):
    """D-FINE's gated residual: ``norm(g1 * residual + g2 * update)`` with sigmoid gates."""

    def __init__(self, *, embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * embed_dim, 2 * embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, residual: Tensor, update: Tensor) -> Tensor:
        g_residual, g_update = self.linear(torch.cat([residual, update], -1)).sigmoid().chunk(2, -1)
        return self.norm(g_residual * residual + g_update * update)


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention -> FFN, each followed by residual + norm.

    ``gated`` (D-FINE) replaces the cross-attention's residual + norm by :class:`Gate` and clamps
    the FFN output to the float16 range before the last norm, as the D-FINE release does.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, ffn_dim: int, cross_attn: MSDeformableAttention,
                 dropout: float = 0.0, activation: str = "relu", gated: bool = False,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.self_attn = SelfAttention(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.cross_attn = cross_attn
        self.gate = Gate(embed_dim=embed_dim) if gated else None
        self.norm2 = None if gated else nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.ffn = MLP(in_dim=embed_dim, hidden_dim=ffn_dim, out_dim=embed_dim, num_layers=2,
                       activation=activation)
        self.norm3 = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.gated = gated

    def forward(self, x: Tensor, pos: Tensor, reference_boxes: Tensor, memory: Tensor,
                spatial_shapes: Sequence[tuple[int, int]], attn_mask: Tensor | None = None) -> Tensor:
        """x, pos Float[B,Q,D]; reference_boxes Float[B,Q,4]; memory Float[B,S,D] -> Float[B,Q,D]."""
        x = self.norm1(x + self.dropout(self.self_attn(x, pos, attn_mask)))
        update = self.dropout(self.cross_attn(x + pos, reference_boxes, memory, spatial_shapes))
        if self.gate is not None:
            x = self.gate(x, update)
        else:
            assert self.norm2 is not None
            x = self.norm2(x + update)
        x = x + self.dropout(self.ffn(x))
        return self.norm3(x.clamp(-65504, 65504) if self.gated else x)


class RTDETRDecoder(nn.Module):
    """RT-DETR's decoder: every layer refines the boxes of the previous one in logit space.

    Each layer's queries get a position from their current (detached) boxes through
    ``query_pos_head``; its box head predicts a logit delta. As in the RT-DETR release the boxes
    reported for layer i > 0 add the delta to the previous layer's *undetached* boxes (the same
    values; the gradient reaches the earlier layers), while the next layer starts from detached ones.
    """

    def __init__(self, *, layers: Sequence[DecoderLayer], embed_dim: int, num_classes: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.query_pos_head = MLP(in_dim=4, hidden_dim=2 * embed_dim, out_dim=embed_dim, num_layers=2)
        self.class_heads = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in layers)
        self.box_heads = nn.ModuleList(MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4, num_layers=3)
                                       for _ in layers)

    def forward(self, x: Tensor, reference_logits: Tensor, memory: Tensor,
                spatial_shapes: Sequence[tuple[int, int]],
                attn_mask: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """x Float[B,Q,D] initial queries, reference_logits Float[B,Q,4] (detached) ->
        per-layer logits [Float[B,Q,C]] * L and boxes [Float[B,Q,4]] * L."""
        ref_detached = reference_logits.sigmoid()
        ref = ref_detached
        all_logits, all_boxes = [], []
        for layer, class_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            x = layer(x, self.query_pos_head(ref_detached), ref_detached, memory, spatial_shapes, attn_mask)
            delta = box_head(x)
            all_boxes.append(torch.sigmoid(delta + inverse_sigmoid(ref)))
            all_logits.append(class_head(x))
            ref = torch.sigmoid(delta + inverse_sigmoid(ref_detached))
            ref_detached = ref.detach()
        return all_logits, all_boxes
