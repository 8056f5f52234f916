"""transformers ``LwDetrForObjectDetection`` / ``RfDetrForObjectDetection`` decoders -> detkit
``LWDETRHead`` (the ViT backbone and the projector are :mod:`.hf_vit`'s).

* ``lwdetr_head_config(config)``: the ``LWDETRHead`` node of an ``lw_detr`` / ``rf_detr`` config
  (a transformers config object or a ``config.json`` mapping; omitted fields take transformers'
  defaults). All ``group_detr`` query groups are kept, so a converted model can be fine-tuned
  with Group DETR; inference uses group 0 only, as transformers does.
* ``convert_lwdetr_head(state, config, prefix="head.")``: strict, every source key outside the
  backbone / projector is used exactly once, and every detkit head tensor is filled; anything
  else is a ValueError naming the key.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

__all__ = ["lwdetr_head_config", "convert_lwdetr_head", "lwdetr_model_parts", "convert_lwdetr_state_dict",
           "LWDETR_MODEL_TYPES"]

# transformers' defaults of the decoder fields (LwDetrConfig / RfDetrConfig)
_COMMON = dict(d_model=256, decoder_ffn_dim=2048, decoder_n_points=4, decoder_layers=3,
               decoder_self_attention_heads=8, decoder_cross_attention_heads=16,
               decoder_activation_function="relu", num_queries=300, group_detr=13)
LWDETR_MODEL_TYPES: dict[str, dict[str, Any]] = {
    "lw_detr": dict(_COMMON, dropout=0.0, projector_scale_factors=[]),
    "rf_detr": dict(_COMMON, dropout=0.1),
}
_LEVEL_NAMES = {2.0: "p3", 1.0: "p4", 0.5: "p5"}   # the projector's level names per scale factor

_LAYER_RULES = [(r"self_attn\.o_proj\.", "self_attn.out_proj."),
                (r"self_attn\.([qkv])_proj\.", r"self_attn.\1_proj."),
                (r"self_attn_layer_norm\.", "norm1."), (r"cross_attn_layer_norm\.", "norm2."),
                (r"cross_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.",
                 r"cross_attn.\1."),
                (r"mlp\.fc1\.", "ffn.layers.0."), (r"mlp\.fc2\.", "ffn.layers.1."),
                (r"layer_norm\.", "norm3.")]
_ORIGINAL_LAYER_RULES = [(r"self_attn\.out_proj\.", "self_attn.out_proj."), (r"(norm[123])\.", r"\1."),
                         (r"cross_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.",
                          r"cross_attn.\1."),
                         (r"linear1\.", "ffn.layers.0."), (r"linear2\.", "ffn.layers.1.")]
_RULES = [(re.compile(p), r) for p, r in [
    (r"^model\.query_feat\.", "query_feat."),
    (r"^model\.reference_point_embed\.", "reference_point_embed."),
    (r"^model\.enc_output\.(\d+)\.", r"query_selection.enc_output.\1."),
    (r"^model\.enc_output_norm\.(\d+)\.", r"query_selection.enc_output_norm.\1."),
    (r"^model\.enc_out_class_embed\.(\d+)\.", r"query_selection.score_heads.\1."),
    (r"^model\.enc_out_bbox_embed\.(\d+)\.layers\.", r"query_selection.box_heads.\1.layers."),
    (r"^model\.decoder\.layernorm\.", "decoder.norm."),
    (r"^model\.decoder\.ref_point_head\.layers\.", "decoder.ref_point_head.layers."),
    (r"^class_embed\.", "decoder.class_head."),
    (r"^bbox_embed\.layers\.", "decoder.box_head.layers."),
    # the original RF-DETR / LW-DETR layout (what RfDetrForObjectDetection.save_pretrained writes)
    (r"^query_feat\.", "query_feat."), (r"^refpoint_embed\.", "reference_point_embed."),
    (r"^transformer\.enc_output\.(\d+)\.", r"query_selection.enc_output.\1."),
    (r"^transformer\.enc_output_norm\.(\d+)\.", r"query_selection.enc_output_norm.\1."),
    (r"^transformer\.enc_out_class_embed\.(\d+)\.", r"query_selection.score_heads.\1."),
    (r"^transformer\.enc_out_bbox_embed\.(\d+)\.layers\.", r"query_selection.box_heads.\1.layers."),
    (r"^transformer\.decoder\.norm\.", "decoder.norm."),
    (r"^transformer\.decoder\.ref_point_head\.layers\.", "decoder.ref_point_head.layers."),
] + [(r"^model\.decoder\.layers\.(\d+)\." + p, r"decoder.layers.\1." + r.replace("\\1", "\\2"))
     for p, r in _LAYER_RULES]
  + [(r"^transformer\.decoder\.layers\.(\d+)\." + p, r"decoder.layers.\1." + r.replace("\\1", "\\2"))
     for p, r in _ORIGINAL_LAYER_RULES]]
_FUSED_QKV = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$")
# the original code also stores the shared heads under the decoder: the same tensors again
_ALIASES = {"transformer.decoder.class_embed.": "class_embed.",
            "transformer.decoder.bbox_embed.": "bbox_embed."}


def _fields(config: Any) -> dict:
    raw = dict(config) if isinstance(config, Mapping) else config.to_dict()
    kind = raw.get("model_type")
    if kind not in LWDETR_MODEL_TYPES:
        raise ValueError(f"config model_type {kind!r} is not lw_detr or rf_detr")
    return {**LWDETR_MODEL_TYPES[kind], **raw}


def lwdetr_head_config(config: Any) -> dict:
    """The detkit ``LWDETRHead`` node of a transformers ``lw_detr`` / ``rf_detr`` config."""
    cfg = _fields(config)
    if cfg["model_type"] == "rf_detr":
        levels = ["p4"]          # RF-DETR's projector has one level (scale 1.0)
    else:
        factors = [float(f) for f in cfg["projector_scale_factors"]]
        if not factors:
            raise ValueError("lw_detr config has no projector_scale_factors: no feature level")
        levels = [_LEVEL_NAMES[f] for f in factors]
    return {"type": "LWDETRHead", "in_features": levels, "num_levels": len(levels),
            "hidden_dim": int(cfg["d_model"]), "num_queries": int(cfg["num_queries"]),
            "num_groups": int(cfg["group_detr"]), "num_decoder_layers": int(cfg["decoder_layers"]),
            "num_heads": int(cfg["decoder_self_attention_heads"]),
            "num_cross_heads": int(cfg["decoder_cross_attention_heads"]),
            "num_points": int(cfg["decoder_n_points"]), "ffn_dim": int(cfg["decoder_ffn_dim"]),
            "dropout": float(cfg["dropout"]),
            "attention_dropout": float(cfg.get("attention_dropout", 0.0)),
            "activation": str(cfg["decoder_activation_function"])}


def _is_backbone_key(key: str) -> bool:
    return key.startswith(("model.backbone.", "backbone."))


def _rename(key: str) -> str | None:
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


def _expected(config: Any) -> set[str]:
    """The detkit head's parameter names for this config (built on the meta device: no memory)."""
    import torch

    from ...structures import ShapeSpec
    from ..heads.lwdetr_head import LWDETRHead

    node = {k: v for k, v in lwdetr_head_config(config).items() if k != "type"}
    shapes = {name: ShapeSpec(node["hidden_dim"], 16) for name in node["in_features"]}
    labels = config.get("id2label") if isinstance(config, Mapping) else getattr(config, "id2label", None)
    with torch.device("meta"):
        head = LWDETRHead(input_shapes=shapes, num_classes=max(len(labels or {}), 1), **node)
    return set(head.state_dict())


def convert_lwdetr_head(state: Mapping[str, Tensor], config: Any, *,
                        prefix: str = "head.") -> dict[str, Tensor]:
    """The decoder tensors of an ``LwDetr`` / ``RfDetr`` ``ForObjectDetection`` state dict ->
    detkit ``LWDETRHead`` keys under ``prefix`` (strict; see the module docstring)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if _is_backbone_key(key):
            continue
        alias = next((a for a in _ALIASES if key.startswith(a)), None)
        if alias is not None:
            same = state.get(_ALIASES[alias] + key[len(alias):])
            if same is None or not same.equal(value):
                unknown.append(key)
            continue
        fused = _FUSED_QKV.match(key)
        if fused:
            layer, kind = fused.groups()
            for name, part in zip("qkv", value.chunk(3, 0)):
                out[f"decoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = value
    if unknown:
        raise ValueError(f"unexpected decoder keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(_expected(config) - set(out))
    if missing:
        raise ValueError(f"the state dict has no tensors for the head's {missing[:5]}")
    extra = sorted(set(out) - _expected(config))
    if extra:
        raise ValueError(f"tensors {extra[:5]} do not fit this config's head (e.g. more groups or layers)")
    return {prefix + k: v for k, v in out.items()}


def lwdetr_model_parts(config: Any) -> dict:
    """``backbone`` (ViT), ``neck`` (RFDETRProjector), ``head`` (LWDETRHead) nodes and the
    ``size_divisibility`` (patch size x windows per side: windowed blocks need whole windows) of an
    ``lw_detr`` / ``rf_detr`` config."""
    from .hf_vit import projector_config, vit_backbone_config

    backbone = vit_backbone_config(config)
    divisor = int(backbone["patch_size"]) * int(backbone.get("windows_per_side", 1) or 1)
    return {"backbone": backbone, "neck": projector_config(config), "head": lwdetr_head_config(config),
            "size_divisibility": divisor}


def convert_lwdetr_state_dict(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """The whole detkit ``DETRDetector`` state dict (``backbone.``, ``neck.``, ``head.``) of an
    ``LwDetr`` / ``RfDetr`` ``ForObjectDetection`` state dict."""
    from .hf_vit import convert_vit_parts

    return {**convert_vit_parts(state, config), **convert_lwdetr_head(state, config)}
