"""RTDETRHead: RT-DETR (v1 and v2) decoder head, everything after the hybrid encoder.

Legend: B images, L levels, D = hidden_dim, Q = num_queries, Nd denoising queries, C classes.
Boxes are cxcywh normalised to the padded input (H_pad, W_pad) inside the head; ``predict``
returns xyxy pixels. The raw-output dict follows the RT-DETR / D-FINE SetCriterion names
(``pred_logits``, ``pred_boxes``, ``aux_outputs``, ``enc_aux_outputs``, ``dn_outputs``,
``dn_meta``; see :func:`detkit.models.detr.assemble_outputs`), plus ``image_size`` (H_pad, W_pad).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ...registry import HEADS, ConfigError, closest, construct
from ...structures import ShapeSpec
from ..detr.attention import MSDeformableAttention
from ..detr.decoder import DecoderLayer, RTDETRDecoder
from ..detr.denoising import contrastive_denoising_queries
from ..detr.outputs import SetPredictionMixin, assemble_outputs
from ..detr.query_selection import LevelProjection, QuerySelection, flatten_levels, select_levels

__all__ = ["RTDETRHead", "build_criterion"]

CRITERION_MODULE = "detkit.models.detr.criterion"


def build_criterion(node: dict, path: str, num_classes: int | None = None) -> nn.Module:
    """A criterion from its config node ``{type: <class exported by detkit.models.detr.criterion>,
    ...}``; it gets the head's ``num_classes`` when it takes one and the node does not set it."""
    kwargs = {k: v for k, v in node.items() if k != "type"}
    name = str(node.get("type"))
    try:
        module = importlib.import_module(CRITERION_MODULE)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{path}: no criterion module ({CRITERION_MODULE}) in this detkit") from e
    names = list(getattr(module, "__all__", []))
    if name not in names:
        raise ConfigError(f"{path}.type: unknown criterion '{name}'{closest(name, names)}; "
                          f"available: {', '.join(sorted(names)) or '(none)'}")
    cls = getattr(module, name)
    if "num_classes" in inspect.signature(cls).parameters and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return construct(cls, kwargs, path, name)


@HEADS.register()
class RTDETRHead(SetPredictionMixin, nn.Module):
    """Level projections -> top-k query selection -> deformable decoder with box refinement.

    Args:
        input_shapes: the neck's levels (channels, stride); ``in_features`` picks and orders them
            (default: all, by stride).
        num_classes: C (no background class; sigmoid scores).
        hidden_dim / num_queries / num_levels / num_decoder_layers / num_heads / ffn_dim: the
            decoder's sizes; levels beyond the inputs come from 3x3 stride-2 convs.
        num_points: sampling points per level and head (one int, or one per level: RT-DETRv2).
        offset_scale: offsets relative to the reference box (RT-DETRv2; v1 is 0.5).
        sampling_method: "default" (bilinear) or "discrete" (RT-DETRv2's nearest pixel).
        exportable: gather-based bilinear sampling instead of ``grid_sample`` (same numbers).
        num_denoising / label_noise_ratio / box_noise_scale: contrastive denoising in training.
        learn_initial_query: learned query features instead of the selected memory features.
        num_top_queries: detections kept per image by ``predict``.
        criterion: the loss module, called ``criterion(outputs, detr_targets)``; None for inference
            (in a config: a node naming a class of ``detkit.models.detr.criterion``).
    """

    decoder: Any                   # RTDETRDecoder or FDRDecoder (see build_decoder)
    query_selection: QuerySelection
    gated_layers = False           # D-FINE: gated cross-attention residual
    attention_projections = True   # D-FINE: no value / output projections in the attention
    identity_projections = False   # D-FINE: identity level projections when channels match

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 in_features: Sequence[str] | None = None, hidden_dim: int = 256, num_queries: int = 300,
                 num_levels: int = 3, num_decoder_layers: int = 6, num_heads: int = 8, ffn_dim: int = 1024,
                 dropout: float = 0.0, activation: str = "relu", num_points: int | Sequence[int] = 4,
                 offset_scale: float = 0.5, sampling_method: str = "default", exportable: bool = False,
                 num_denoising: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                 learn_initial_query: bool = False, layer_norm_eps: float = 1e-5,
                 batch_norm_eps: float = 1e-5, num_top_queries: int = 300,
                 criterion: nn.Module | None = None):
        super().__init__()
        names = select_levels(input_shapes, in_features)
        self.in_features, self.first_stride = names, input_shapes[names[0]].stride
        self.num_classes, self.num_queries, self.num_top_queries = num_classes, num_queries, num_top_queries
        self.num_denoising, self.label_noise_ratio = num_denoising, label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.denoising_generator: torch.Generator | None = None   # seeds the denoising noise if set
        self.input_proj = LevelProjection(in_channels=[input_shapes[n].channels for n in names],
                                          embed_dim=hidden_dim, num_levels=num_levels,
                                          identity_if_equal=self.identity_projections,
                                          batch_norm_eps=batch_norm_eps)
        self.query_selection = QuerySelection(embed_dim=hidden_dim, num_classes=num_classes,
                                              num_queries=num_queries, layer_norm_eps=layer_norm_eps)
        self.denoising_embed = (nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
                                if num_denoising > 0 else None)
        self.query_embed = nn.Embedding(num_queries, hidden_dim) if learn_initial_query else None
        layers = [DecoderLayer(
            embed_dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout,
            activation=activation, gated=self.gated_layers, layer_norm_eps=layer_norm_eps,
            cross_attn=MSDeformableAttention(
                embed_dim=hidden_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                offset_scale=offset_scale, method=sampling_method, exportable=exportable,
                value_proj=self.attention_projections, output_proj=self.attention_projections))
            for _ in range(num_decoder_layers)]
        self.decoder = self.build_decoder(layers, hidden_dim)
        self.criterion = criterion
        self._init_heads()

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, **extra: Any) -> "RTDETRHead":
        """As the constructor, except that ``criterion`` may be a config node (see
        :func:`build_criterion`)."""
        kwargs = {**cfg, **extra}
        if isinstance(kwargs.get("criterion"), dict):
            kwargs["criterion"] = build_criterion(kwargs["criterion"], f"{path}.criterion",
                                                  kwargs.get("num_classes"))
        return construct(cls, kwargs, path, cls.__name__)

    def build_decoder(self, layers: list[DecoderLayer], hidden_dim: int) -> nn.Module:
        return RTDETRDecoder(layers=layers, embed_dim=hidden_dim, num_classes=self.num_classes)

    def _init_heads(self) -> None:
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in [self.query_selection.score_head, *self.decoder.class_heads]:
            nn.init.constant_(head.bias, prior_bias)
        memory_linear = self.query_selection.memory_proj[0]
        assert isinstance(memory_linear, nn.Linear)
        nn.init.xavier_uniform_(memory_linear.weight)
        for layer in self.decoder.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        if self.query_embed is not None:
            nn.init.xavier_uniform_(self.query_embed.weight)

    def set_exportable(self, exportable: bool = True) -> None:
        """Switch every deformable attention to the gather-based sampler (or back)."""
        for module in self.modules():
            if isinstance(module, MSDeformableAttention):
                module.exportable = exportable

    def decode(self, queries: Tensor, reference_logits: Tensor, memory: Tensor,
               shapes: list[tuple[int, int]], attn_mask: Tensor | None) -> tuple[list[dict], dict | None]:
        """Per-layer ``{pred_logits, pred_boxes}`` over all Nd+Q queries (and no pre-bbox output)."""
        logits, boxes = self.decoder(queries, reference_logits, memory, shapes, attn_mask)
        return [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits, boxes)], None

    def forward(self, features: dict[str, Tensor], targets: list[dict] | None = None) -> dict:
        """features: the neck's levels; targets (training only, for denoising): DETR format
        ``[{labels Int64[N], boxes Float[N,4] cxcywh normalised}]``. Returns the raw-output dict."""
        first = features[self.in_features[0]]
        levels = self.input_proj([features[n] for n in self.in_features])
        memory, shapes = flatten_levels(levels)
        selected = self.query_selection(memory, shapes)      # K = min(Q, S) queries (tiny maps: S < Q)
        num_selected = selected["queries"].shape[1]
        queries = (self.query_embed.weight[None, :num_selected].expand(memory.shape[0], -1, -1)
                   if self.query_embed is not None else selected["queries"])
        reference = selected["box_logits"].detach()
        dn = None
        if self.training and targets is not None and self.denoising_embed is not None:
            dn = contrastive_denoising_queries(
                targets, num_classes=self.num_classes, num_queries=num_selected,
                label_embed=self.denoising_embed, num_denoising=self.num_denoising,
                label_noise_ratio=self.label_noise_ratio, box_noise_scale=self.box_noise_scale,
                generator=self.denoising_generator)
        if dn is not None:
            queries = torch.cat([dn.embeddings, queries], 1)
            reference = torch.cat([dn.box_logits, reference], 1)
        layers, pre = self.decode(queries, reference, memory, shapes, None if dn is None else dn.attn_mask)
        encoder = {"pred_logits": selected["logits"], "pred_boxes": selected["boxes"]}
        outputs = assemble_outputs(layers, encoder, None if dn is None else dn.meta, pre)
        stride = self.first_stride
        height, width = first.shape[-2:]
        outputs["image_size"] = (height * stride, width * stride)   # (traced sizes when exporting)
        return outputs

