"""transformers RT-DETR v1 / v2 and D-FINE decoder side -> detkit ``RTDETRHead`` / ``DFINEHead``.

``head_config(config)`` gives the head's detkit config node (``num_classes`` and ``input_shapes``
come from the detector); ``convert_head(state, config)`` renames every head tensor of a
``...ForObjectDetection`` state dict to ``head.*``. Strict: each source key under
:data:`HEAD_SOURCE_PREFIXES` is used exactly once (the tied aliases ``class_embed.*`` /
``bbox_embed.*`` of ``model.decoder.class_embed.*`` / ``bbox_embed.*`` count as the same tensor),
and a key no rule knows is an error naming it. ``config`` is a transformers config object or a
``config.json`` mapping (fields it omits take the transformers defaults).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from .hf_defaults import HF_DEFAULTS

__all__ = ["head_config", "convert_head", "HEAD_SOURCE_PREFIXES", "is_head_key"]

HEAD_SOURCE_PREFIXES = ("model.decoder_input_proj.", "model.enc_output.", "model.enc_score_head.",
                        "model.enc_bbox_head.", "model.denoising_class_embed.", "model.weight_embedding.",
                        "model.decoder.", "class_embed.", "bbox_embed.")

# inside model.decoder.layers.{i}.; the Hub's checkpoints were written before transformers 5
# renamed ``self_attn.out_proj`` -> ``o_proj`` and ``fc1`` / ``fc2`` -> ``mlp.*``: both are read
_LAYER_RULES = [
    (r"self_attn\.(q|k|v)_proj\.", r"self_attn.\1_proj."),
    (r"self_attn\.(o|out)_proj\.", "self_attn.out_proj."),
    (r"self_attn_layer_norm\.", "norm1."),
    (r"encoder_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.", r"cross_attn.\1."),
    (r"encoder_attn_layer_norm\.", "norm2."),
    (r"mlp\.fc1\.", "ffn.layers.0."),
    (r"mlp\.fc2\.", "ffn.layers.1."),
    (r"mlp\.layers\.(\d+)\.", r"ffn.layers.\1."),
    (r"fc1\.", "ffn.layers.0."),
    (r"fc2\.", "ffn.layers.1."),
    (r"final_layer_norm\.", "norm3."),
    (r"gateway\.gate\.", "gate.linear."),
    (r"gateway\.norm\.", "gate.norm."),
]

_RULES = [(re.compile(p), r) for p, r in [
    (r"^model\.decoder_input_proj\.(\d+)\.0\.", r"input_proj.projections.\1.conv."),
    (r"^model\.decoder_input_proj\.(\d+)\.1\.", r"input_proj.projections.\1.norm."),
    (r"^model\.enc_output\.0\.", "query_selection.memory_proj.linear."),
    (r"^model\.enc_output\.1\.", "query_selection.memory_proj.norm."),
    (r"^model\.enc_score_head\.", "query_selection.score_head."),
    (r"^model\.enc_bbox_head\.", "query_selection.box_head."),
    (r"^model\.denoising_class_embed\.", "denoising_embed."),
    (r"^model\.weight_embedding\.", "query_embed."),
    (r"^model\.decoder\.query_pos_head\.", "decoder.query_pos_head."),
    (r"^model\.decoder\.pre_bbox_head\.", "decoder.pre_box_head."),
    (r"^model\.decoder\.lqe_layers\.(\d+)\.reg_conf\.", r"decoder.quality.\1.mlp."),
    (r"^model\.decoder\.(reg_scale|up)$", r"decoder.\1"),
    (r"^model\.decoder\.class_embed\.", "decoder.class_heads."),
    (r"^model\.decoder\.bbox_embed\.", "decoder.box_heads."),
] + [(r"^model\.decoder\.layers\.(\d+)\." + p, r"decoder.layers.\1." + r.replace("\\1", "\\2"))
     for p, r in _LAYER_RULES]]

_POINT_SCALE = re.compile(r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.n(um)?_points_scale$")


def is_head_key(key: str) -> bool:
    """Whether a transformers state-dict key belongs to the decoder head (this converter)."""
    return key.startswith(HEAD_SOURCE_PREFIXES)


def _get(config: Any, name: str) -> Any:
    model_type = _model_type(config)
    if isinstance(config, Mapping):
        if name in config:
            return config[name]
    elif hasattr(config, name):
        return getattr(config, name)
    if name in HF_DEFAULTS[model_type]:
        return HF_DEFAULTS[model_type][name]
    raise KeyError(f"config has no '{name}' and transformers has no default for it")


def _model_type(config: Any) -> str:
    model_type = (config.get("model_type") if isinstance(config, Mapping)
                  else getattr(config, "model_type", None))
    if model_type not in ("rt_detr", "rt_detr_v2", "d_fine"):
        raise ValueError(f"config model_type {model_type!r} is not rt_detr, rt_detr_v2 or d_fine")
    return str(model_type)


def head_config(config: Any) -> dict:
    """The detkit head node ``{type: RTDETRHead | DFINEHead, ...}`` of a transformers config."""
    model_type = _model_type(config)
    levels = int(_get(config, "num_feature_levels"))
    if model_type == "rt_detr_v2" and int(_get(config, "decoder_n_levels")) != levels:
        raise ValueError(f"decoder_n_levels {_get(config, 'decoder_n_levels')} differs from "
                         f"num_feature_levels {levels}: detkit samples every decoder level")
    points = _get(config, "decoder_n_points")
    head: dict[str, Any] = {
        "type": "DFINEHead" if model_type == "d_fine" else "RTDETRHead",
        "hidden_dim": int(_get(config, "d_model")), "num_queries": int(_get(config, "num_queries")),
        "num_levels": levels, "num_decoder_layers": int(_get(config, "decoder_layers")),
        "num_heads": int(_get(config, "decoder_attention_heads")),
        "ffn_dim": int(_get(config, "decoder_ffn_dim")), "dropout": float(_get(config, "dropout")),
        "activation": str(_get(config, "decoder_activation_function")),
        "num_points": [int(p) for p in points] if isinstance(points, (list, tuple)) else int(points),
        "offset_scale": 0.5 if model_type == "rt_detr" else float(_get(config, "decoder_offset_scale")),
        "sampling_method": "default" if model_type == "rt_detr" else str(_get(config, "decoder_method")),
        "num_denoising": int(_get(config, "num_denoising")),
        "label_noise_ratio": float(_get(config, "label_noise_ratio")),
        "box_noise_scale": float(_get(config, "box_noise_scale")),
        "learn_initial_query": bool(_get(config, "learn_initial_query")),
        "layer_norm_eps": float(_get(config, "layer_norm_eps")),
        "batch_norm_eps": float(_get(config, "batch_norm_eps")),
    }
    if model_type == "d_fine":
        layers, eval_idx = head["num_decoder_layers"], int(_get(config, "eval_idx"))
        if eval_idx not in (-1, layers - 1):
            raise ValueError(f"eval_idx {eval_idx}: detkit's D-FINE evaluates the last decoder layer "
                             f"(eval_idx -1), as every released D-FINE model")
        head.update(reg_max=int(_get(config, "max_num_bins")), reg_scale=float(_get(config, "reg_scale")),
                    up=float(_get(config, "up")), lqe_top_k=int(_get(config, "top_prob_values")),
                    lqe_hidden_dim=int(_get(config, "lqe_hidden_dim")),
                    lqe_layers=int(_get(config, "lqe_layers")))
    return head


def _expected_point_scale(config: Any) -> Tensor:
    points = _get(config, "decoder_n_points")
    levels = int(_get(config, "num_feature_levels"))
    per_level = list(points) if isinstance(points, (list, tuple)) else [int(points)] * levels
    return torch.tensor([1.0 / p for p in per_level for _ in range(p)])


def _rename(key: str) -> str | None:
    for pattern, replacement in _RULES:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return None


def convert_head(state: Mapping[str, Tensor], config: Any, *, prefix: str = "head.") -> dict[str, Tensor]:
    """``{prefix + detkit key: tensor}`` for every head key of a transformers state dict.

    Raises KeyError naming the keys no rule knows (or a tied alias without its original that
    disagrees with it) and ValueError when a sampling-point scale contradicts ``decoder_n_points``.
    """
    head_keys = [k for k in state if is_head_key(k)]
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key in head_keys:
        source = key
        if key.startswith(("class_embed.", "bbox_embed.")):     # tied alias of model.decoder.*
            original = "model.decoder." + key
            if original in state:
                if state[original].shape != state[key].shape:
                    raise KeyError(f"{key} and {original} are tied but have shapes "
                                   f"{tuple(state[key].shape)} and {tuple(state[original].shape)}")
                continue
            source = original
        if _POINT_SCALE.match(key):
            expected = _expected_point_scale(config)
            if state[key].shape != expected.shape or not torch.allclose(state[key].float(), expected):
                raise ValueError(f"{key} {state[key].tolist()} does not match decoder_n_points "
                                 f"{_get(config, 'decoder_n_points')}")
            continue                     # detkit recomputes it from num_points
        target = _rename(source)
        if target is None:
            unknown.append(key)
            continue
        if prefix + target in out:
            raise KeyError(f"{key}: the detkit key {prefix + target} was already filled")
        out[prefix + target] = state[key]
    if unknown:
        raise KeyError(f"{len(unknown)} transformers head keys have no detkit counterpart: "
                       f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    return out
