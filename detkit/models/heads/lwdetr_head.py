"""LWDETRHead: the LW-DETR / RF-DETR decoder head, everything after the projector.

Legend: B images, G query groups (``num_groups`` in training, 1 at evaluation), Q queries per
group, K = min(Q, S) used per group, D = hidden_dim, C classes. Boxes are cxcywh normalised to the
padded input (H_pad, W_pad) inside the head; ``predict`` returns xyxy pixels. The raw-output dict
follows the RT-DETR SetCriterion names (``pred_logits``, ``pred_boxes``, ``aux_outputs``,
``enc_aux_outputs``) with G*K queries in training, plus ``num_groups`` (the criterion matches
each group on its own) and ``image_size`` (H_pad, W_pad).

Pipeline (as transformers' ``LwDetrModel`` / ``RfDetrModel``): per group, encoder heads score
the memory positions and keep the K best proposals; a learned per-query box delta
(``reference_point_embed``) refines the detached proposal once into the reference box; learned
``query_feat`` queries go through the decoder layers (group self-attention, deformable
cross-attention around the fixed reference, FFN); every layer's boxes refine that reference.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor, nn

from ...registry import HEADS, construct
from ...structures import ShapeSpec
from ..detr.attention import MSDeformableAttention
from ..detr.decoder import DecoderLayer
from ..detr.lw_decoder import GroupQuerySelection, GroupSelfAttention, LWDETRDecoder, refine_boxes
from ..detr.outputs import SetPredictionMixin, assemble_outputs
from ..detr.query_selection import flatten_levels, select_levels
from .rtdetr_head import build_criterion

__all__ = ["LWDETRHead"]


@HEADS.register()
class LWDETRHead(SetPredictionMixin, nn.Module):
    """Group two-stage query selection -> LW-DETR decoder with shared heads.

    Args:
        input_shapes: the projector's levels (all ``hidden_dim`` channels); ``in_features`` picks
            and orders them (default: all, by stride); ``num_levels`` must equal their count.
        num_classes: C (no background class; sigmoid scores).
        hidden_dim / num_queries / num_decoder_layers / ffn_dim: the decoder's sizes.
        num_groups: G, Group DETR's query groups in training (13 in the papers; 1 at inference).
        num_heads / num_cross_heads: heads of the self-attention / of the deformable cross-attention.
        num_points: sampling points per level and cross-attention head.
        dropout / activation / layer_norm_eps: of the decoder layers (dropout after each sublayer).
        attention_dropout: on the self-attention probabilities (transformers' ``attention_dropout``).
        exportable: gather-based bilinear sampling instead of ``grid_sample`` (same numbers).
        num_top_queries: detections kept per image by ``predict``.
        criterion: the loss module, called ``criterion(outputs, detr_targets)``; None for inference
            (in a config: a node naming a class of ``detkit.models.detr.criterion``).
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 in_features: Sequence[str] | None = None, hidden_dim: int = 256, num_queries: int = 300,
                 num_groups: int = 13, num_levels: int | None = None, num_decoder_layers: int = 3,
                 num_heads: int = 8, num_cross_heads: int = 16, num_points: int = 4, ffn_dim: int = 2048,
                 dropout: float = 0.0, attention_dropout: float = 0.0, activation: str = "relu",
                 layer_norm_eps: float = 1e-5,
                 exportable: bool = False, num_top_queries: int = 300, criterion: nn.Module | None = None):
        super().__init__()
        names = select_levels(input_shapes, in_features)
        wrong = {n: input_shapes[n].channels for n in names if input_shapes[n].channels != hidden_dim}
        if wrong:
            raise ValueError(f"LWDETRHead has no input projections: levels {wrong} do not have "
                             f"hidden_dim={hidden_dim} channels")
        if num_levels is not None and num_levels != len(names):
            raise ValueError(f"num_levels {num_levels} != the {len(names)} input levels {names}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.in_features = names
        # the padded input size comes from the finest level (a 0.5-scale level rounds its size up)
        self.size_level = min(names, key=lambda n: input_shapes[n].stride)
        self.size_stride = input_shapes[self.size_level].stride
        self.num_classes, self.num_queries, self.num_groups = num_classes, num_queries, num_groups
        self.num_top_queries = num_top_queries
        self.query_feat = nn.Embedding(num_groups * num_queries, hidden_dim)
        self.reference_point_embed = nn.Embedding(num_groups * num_queries, 4)
        self.query_selection = GroupQuerySelection(embed_dim=hidden_dim, num_classes=num_classes,
                                                   num_queries=num_queries, num_groups=num_groups,
                                                   layer_norm_eps=layer_norm_eps)
        layers = []
        for _ in range(num_decoder_layers):
            layer = DecoderLayer(
                embed_dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout,
                activation=activation, layer_norm_eps=layer_norm_eps,
                cross_attn=MSDeformableAttention(embed_dim=hidden_dim, num_heads=num_cross_heads,
                                                 num_levels=len(names), num_points=num_points,
                                                 exportable=exportable))
            layer.self_attn = GroupSelfAttention(embed_dim=hidden_dim, num_heads=num_heads,
                                                 num_groups=num_groups,
                                                 dropout=attention_dropout)
            layers.append(layer)
        self.decoder = LWDETRDecoder(layers=layers, embed_dim=hidden_dim, num_classes=num_classes,
                                     layer_norm_eps=layer_norm_eps)
        self.criterion = criterion
        self._init_heads()

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, **extra: Any) -> "LWDETRHead":
        """As the constructor, except that ``criterion`` may be a config node."""
        kwargs = {**cfg, **extra}
        if isinstance(kwargs.get("criterion"), dict):
            kwargs["criterion"] = build_criterion(kwargs["criterion"], f"{path}.criterion",
                                                  kwargs.get("num_classes"))
        return construct(cls, kwargs, path, cls.__name__)

    def _init_heads(self) -> None:
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in [*self.query_selection.score_heads, self.decoder.class_head]:
            nn.init.constant_(head.bias, prior_bias)
        nn.init.zeros_(self.reference_point_embed.weight)   # the reference starts as the proposal
        for attn in self.decoder.modules():
            if isinstance(attn, GroupSelfAttention):
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                    nn.init.xavier_uniform_(proj.weight)
                    nn.init.zeros_(proj.bias)

    def set_exportable(self, exportable: bool = True) -> None:
        """Switch every deformable attention to the gather-based sampler (or back)."""
        for module in self.modules():
            if isinstance(module, MSDeformableAttention):
                module.exportable = exportable

    def _group_queries(self, weight: Tensor, groups: int, k: int) -> Tensor:
        """The first k of the Q learned rows of each of the first ``groups`` groups: Float[G*K,X]."""
        return weight[:groups * self.num_queries].reshape(groups, self.num_queries, -1)[:, :k].flatten(0, 1)

    def forward(self, features: dict[str, Tensor], targets: list[dict] | None = None) -> dict:
        """features: the projector's levels; targets: unused (no denoising queries in LW-DETR).
        Returns the raw-output dict."""
        finest = features[self.size_level]
        memory, shapes = flatten_levels([features[n] for n in self.in_features])
        groups = self.num_groups if self.training else 1
        selected = self.query_selection(memory, shapes, groups)
        k = selected["boxes"].shape[1] // groups
        batch = memory.shape[0]
        deltas = self._group_queries(self.reference_point_embed.weight, groups, k)
        reference = refine_boxes(selected["boxes"].detach(), deltas[None])
        queries = self._group_queries(self.query_feat.weight, groups, k)[None].expand(batch, -1, -1)
        logits, boxes = self.decoder(queries, reference, memory, shapes)
        layers = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits, boxes)]
        encoder = {"pred_logits": selected["logits"], "pred_boxes": selected["boxes"]}
        outputs = assemble_outputs(layers, encoder)
        outputs["num_groups"] = groups
        height, width = finest.shape[-2:]
        outputs["image_size"] = (height * self.size_stride, width * self.size_stride)
        return outputs


