"""transformers -> detkit: the backbone (ResNet-vd, HGNetv2) and the hybrid encoder neck.

Config builders take a transformers config (``RTDetrConfig``, ``RTDetrV2Config``, ``DFineConfig``
or the :class:`~.transformers.HFConfig` of a ``config.json`` with its defaults filled in) and
return detkit constructor kwargs, usable as YAML:

    backbone_config(config) -> {type: ResNet, depth: 50, variant: vd, ...} | {type: HGNetv2, name: B4, ...}
    encoder_config(config)  -> {type: HybridEncoder, hidden_dim: 256, fusion: CSPRep, ...}

State converters take the whole ``...ForObjectDetection`` state dict and return the detkit
entries under ``backbone.`` (from ``model.backbone.model.*``) and ``neck.`` (from
``model.encoder_input_proj.*`` and ``model.encoder.*``); the other keys belong to the head. They
are strict: every key under those prefixes is used exactly once and every detkit tensor is
produced with its shape (checked against the detkit module built on the meta device), or a
ConversionError names the leftover, missing or mis-shaped keys.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ...registry import BACKBONES, NECKS
from ..backbones._resnet_vd import VD_STAGE_BLOCKS
from ..backbones.hgnetv2 import HGNETV2_PRESETS
from .transformers import ConversionError

__all__ = ["backbone_config", "encoder_config", "convert_backbone", "convert_encoder",
           "convert_backbone_and_encoder", "BACKBONE_PREFIX", "ENCODER_PREFIXES"]

BACKBONE_PREFIX = "model.backbone.model."
ENCODER_PREFIXES = ("model.encoder_input_proj.", "model.encoder.")
_ACTIVATIONS = ("relu", "silu", "gelu")


def _field(config: Any, name: str) -> Any:
    try:
        return getattr(config, name)
    except AttributeError:
        raise ConversionError(f"config.json: missing field '{name}'") from None


def _require(value: Any, expected: Any, name: str) -> None:
    if value != expected:
        raise ConversionError(f"config.json: {name} = {value!r} is not supported by detkit "
                              f"(it converts {expected!r})")


# ------------------------------------------------------------------------------------ configs
def _out_features(backbone: Any) -> list[str]:
    names = list(_field(backbone, "out_features"))
    bad = [n for n in names if not re.fullmatch(r"stage[1-4]", n)]
    if bad:
        raise ConversionError(f"config.json: backbone_config.out_features {bad} are not stage1..stage4")
    return [f"c{int(n[5:]) + 1}" for n in names]


def _resnet_vd_config(bb: Any) -> dict:
    for name, expected in (("hidden_act", "relu"), ("downsample_in_first_stage", False),
                           ("downsample_in_bottleneck", False), ("num_channels", 3)):
        _require(_field(bb, name), expected, f"backbone_config.{name}")
    blocks, channels = [int(v) for v in _field(bb, "depths")], [int(v) for v in _field(bb, "hidden_sizes")]
    if len(blocks) != 4 or len(channels) != 4:
        raise ConversionError(f"config.json: backbone_config depths {blocks} / hidden_sizes {channels} "
                              f"must have 4 stages")
    bottleneck = _field(bb, "layer_type") == "bottleneck"
    candidates = (50, 101, 152) if bottleneck else (18, 34)
    depth = next((d for d in candidates if VD_STAGE_BLOCKS[d] == blocks), candidates[0])
    cfg: dict[str, Any] = {"type": "ResNet", "depth": depth, "variant": "vd"}
    stem = int(_field(bb, "embedding_size"))
    if stem != 64:
        cfg["stem_channels"] = stem
    if channels != [64 * 2 ** i * (4 if bottleneck else 1) for i in range(4)]:
        cfg["stage_channels"] = channels
    if blocks != VD_STAGE_BLOCKS[depth]:
        cfg["stage_blocks"] = blocks
    return cfg


def _hgnetv2_config(bb: Any) -> dict:
    _require(_field(bb, "hidden_act"), "relu", "backbone_config.hidden_act")
    _require([int(s) for s in _field(bb, "stem_strides")], [2, 1, 1, 2, 1], "backbone_config.stem_strides")
    stem = [int(c) for c in _field(bb, "stem_channels")]
    columns = [_field(bb, f) for f in ("stage_in_channels", "stage_mid_channels", "stage_out_channels",
                                       "stage_num_blocks", "stage_downsample", "stage_light_block",
                                       "stage_kernel_size", "stage_numb_of_layers")]
    if any(len(c) != 4 for c in columns):
        raise ConversionError("config.json: backbone_config stage_* lists must have 4 stages")
    strides = [int(s) for s, down in zip(_field(bb, "stage_downsample_strides"), columns[4]) if down]
    _require(strides, [2] * len(strides), "backbone_config.stage_downsample_strides")
    keys = ("in_channels", "mid_channels", "out_channels", "num_blocks", "downsample", "light_block",
            "kernel_size", "num_layers")
    stages = [{k: (bool(v) if k in ("downsample", "light_block") else int(v)) for k, v in zip(keys, row)}
              for row in zip(*columns)]
    cfg: dict[str, Any] = {"type": "HGNetv2"}
    preset = next((n for n, p in HGNETV2_PRESETS.items()
                   if p["stem_channels"] == stem and p["stages"] == stages), None)
    if preset is not None:
        cfg["name"] = preset
    else:
        cfg.update(name=None, stem_channels=stem, stages=stages)
    cfg["use_lab"] = bool(_field(bb, "use_learnable_affine_block"))
    return cfg


def backbone_config(config: Any) -> dict:
    """detkit backbone kwargs (``{type: ResNet, variant: vd, ...}`` or ``{type: HGNetv2, ...}``)."""
    bb = _field(config, "backbone_config")
    kind = _field(bb, "model_type")
    if kind == "rt_detr_resnet":
        cfg = _resnet_vd_config(bb)
    elif kind == "hgnet_v2":
        cfg = _hgnetv2_config(bb)
    else:
        raise ConversionError(f"config.json: backbone_config of type {kind!r} is not supported "
                              f"(detkit converts rt_detr_resnet and hgnet_v2 backbones)")
    cfg["out_features"] = _out_features(bb)
    cfg["norm"] = "FrozenBN" if _field(config, "freeze_backbone_batch_norms") else "BN"
    return cfg


def encoder_config(config: Any) -> dict:
    """detkit ``HybridEncoder`` kwargs (``input_shapes`` comes from the backbone at build time)."""
    in_features = _out_features(_field(config, "backbone_config"))
    if len(_field(config, "encoder_in_channels")) != len(in_features):
        raise ConversionError(f"config.json: encoder_in_channels has {len(config.encoder_in_channels)} "
                              f"levels but the backbone gives {len(in_features)} ({in_features})")
    levels = [int(i) for i in _field(config, "encode_proj_layers")]
    if any(not -len(in_features) <= i < len(in_features) for i in levels):
        raise ConversionError(f"config.json: encode_proj_layers {levels} out of range for "
                              f"{len(in_features)} levels")
    d_fine = _field(config, "model_type") == "d_fine"
    for name in ("activation_function", "encoder_activation_function"):
        if _field(config, name) not in _ACTIVATIONS:
            raise ConversionError(f"config.json: {name} = {_field(config, name)!r} is not one of "
                                  f"{_ACTIVATIONS}")
    # transformers' pre-norm layer adds the *normalised* input back after the FFN; detkit (and the
    # reference RT-DETR code) add the un-normalised one, so only post-norm converts exactly
    _require(bool(_field(config, "normalize_before")), False, "normalize_before")
    if d_fine:   # transformers' D-FINE hard-codes SiLU in its RepNCSPELAN4 convs
        _require(_field(config, "activation_function"), "silu", "activation_function")
    # eval_size is left out: detkit computes the position embedding of the actual size (what the
    # reference RT-DETR's cached eval_size embedding equals at that size).
    return {"type": "HybridEncoder", "in_features": in_features,
            "hidden_dim": int(_field(config, "encoder_hidden_dim")),
            "attention_levels": [in_features[i] for i in levels],
            "num_encoder_layers": int(_field(config, "encoder_layers")),
            "num_heads": int(_field(config, "encoder_attention_heads")),
            "ffn_dim": int(_field(config, "encoder_ffn_dim")),
            "dropout": float(_field(config, "dropout")),
            "activation_dropout": float(_field(config, "activation_dropout")),
            "encoder_activation": _field(config, "encoder_activation_function"),
            "normalize_before": bool(_field(config, "normalize_before")),
            "layer_norm_eps": float(_field(config, "layer_norm_eps")),
            "pe_temperature": float(_field(config, "positional_encoding_temperature")),
            "fusion": "RepNCSPELAN4" if d_fine else "CSPRep",
            "expansion": float(_field(config, "hidden_expansion")),
            "depth_mult": float(_field(config, "depth_mult")) if d_fine else 1.0,
            "activation": _field(config, "activation_function"),
            "batch_norm_eps": float(_field(config, "batch_norm_eps"))}


# --------------------------------------------------------------------------------- key renames
# Each rename maps a transformers key (without its prefix) to the detkit key, or None when the
# key is not one the architecture has (it is then reported as left over).
def _norm_part(part: str) -> str:
    return {"convolution": "conv", "normalization": "norm"}.get(part, part)


def _resnet_vd_key(key: str) -> str | None:
    m = re.fullmatch(r"embedder\.embedder\.(\d)\.(convolution|normalization)\.(\w+)", key)
    if m:
        return f"stem.{m[1]}.{_norm_part(m[2])}.{m[3]}"
    m = re.fullmatch(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(.+)", key)
    if not m:
        return None
    block, rest = f"layer{int(m[1]) + 1}.{m[2]}", m[3]
    m = re.fullmatch(r"layer\.(\d)\.(convolution|normalization)\.(\w+)", rest)
    if m:
        module = "conv" if m[2] == "convolution" else "bn"
        return f"{block}.{module}{int(m[1]) + 1}.{m[3]}"
    m = re.fullmatch(r"shortcut\.(?:1\.)?(convolution|normalization)\.(\w+)", rest)
    if m:   # the projection after the avg-pool (``shortcut.1``) or alone (``shortcut``)
        return f"{block}.downsample.{1 if m[1] == 'convolution' else 2}.{m[2]}"
    return None


def _hgnetv2_key(key: str) -> str | None:
    m = re.fullmatch(r"embedder\.stem(1|2a|2b|3|4)\.(convolution|normalization|lab)\.(\w+)", key)
    if m:
        return f"stem.conv{m[1]}.{_norm_part(m[2])}.{m[3]}"
    m = re.fullmatch(r"encoder\.stages\.(\d)\.(.+)\.(convolution|normalization|lab)\.(\w+)", key)
    if not m:
        return None
    stage, path, tail = f"stages.{m[1]}", m[2], f"{_norm_part(m[3])}.{m[4]}"
    if path == "downsample":
        return f"{stage}.downsample.{tail}"
    m = re.fullmatch(r"blocks\.(\d+)\.(?:layers\.(\d+)(?:\.conv([12]))?|aggregation\.([01]))", path)
    if not m:
        return None
    block = f"{stage}.blocks.{m[1]}"
    if m[4] is not None:
        return f"{block}.{'squeeze' if m[4] == '0' else 'excite'}.{tail}"
    light = {None: "", "1": ".pointwise", "2": ".depthwise"}[m[3]]
    return f"{block}.convs.{m[2]}{light}.{tail}"


_CONV_NORM = r"(conv|norm)\.(\w+)"
_LAYER_PARTS = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
                "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.out_proj",
                "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "mlp.fc1": "fc1",
                "mlp.fc2": "fc2", "mlp.layers.0": "fc1", "mlp.layers.1": "fc2",
                # the names of files on disk (save_pretrained writes the original checkpoint names)
                "self_attn.out_proj": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"}


def _csp_key(path: str) -> str | None:
    """Inside a CSPRep block: conv1/conv2/conv3 keep their names, bottlenecks -> RepVGG blocks."""
    m = re.fullmatch(r"(conv[123])\." + _CONV_NORM, path)
    if m:
        return f"{m[1]}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"bottlenecks\.(\d+)\.conv([12])\." + _CONV_NORM, path)
    if m:
        return f"blocks.{m[1]}.{'conv3x3' if m[2] == '1' else 'conv1x1'}.{m[3]}.{m[4]}"
    return None


def _elan_key(path: str) -> str | None:
    m = re.fullmatch(r"csp_rep([12])\.(.+)", path)
    if m:
        inner = _csp_key(m[2])
        return None if inner is None else f"csp{m[1]}.{inner}"
    m = re.fullmatch(r"conv([1234])\." + _CONV_NORM, path)
    if m:
        name = {"1": "split_conv", "2": "conv1", "3": "conv2", "4": "merge_conv"}[m[1]]
        return f"{name}.{m[2]}.{m[3]}"
    return None


def _encoder_key(key: str, d_fine: bool) -> str | None:
    """``key`` with its ``model.`` prefix removed."""
    m = re.fullmatch(r"encoder_input_proj\.(\d+)\.([01])\.(\w+)", key)
    if m:
        return f"input_proj.{m[1]}.{'conv' if m[2] == '0' else 'norm'}.{m[3]}"
    m = re.fullmatch(r"encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        part = _LAYER_PARTS.get(m[3])
        return None if part is None else f"aifi.{m[1]}.layers.{m[2]}.{part}.{m[4]}"
    m = re.fullmatch(r"encoder\.lateral_convs\.(\d+)\." + _CONV_NORM, key)
    if m:
        return f"lateral_convs.{m[1]}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"encoder\.downsample_convs\.(\d+)\.(.+)", key)
    if m:
        if not d_fine:
            inner = re.fullmatch(_CONV_NORM, m[2])
            return None if inner is None else f"downsample_convs.{m[1]}.{m[2]}"
        scdown = re.fullmatch(r"conv([12])\." + _CONV_NORM, m[2])
        if scdown is None:
            return None
        part = "pointwise" if scdown[1] == "1" else "depthwise"
        return f"downsample_convs.{m[1]}.{part}.{scdown[2]}.{scdown[3]}"
    m = re.fullmatch(r"encoder\.(fpn_blocks|pan_blocks)\.(\d+)\.(.+)", key)
    if m:
        block = (_elan_key if d_fine else _csp_key)(m[3])
        return None if block is None else f"{m[1]}.{m[2]}.{block}"
    return None


# ----------------------------------------------------------------------------- strict convert
def _strict_rename(state: Mapping[str, Tensor], sources: list[str], rename: Callable[[str], str | None],
                   expected: dict[str, Tensor], part: str, source_prefix: str,
                   detkit_prefix: str) -> dict[str, Tensor]:
    """Rename ``sources`` and check the result against ``expected`` (detkit's own state dict)."""
    out: dict[str, Tensor] = {}
    leftover, mismatched = [], []
    for key in sources:
        target = rename(key)
        if target is None or target not in expected:
            # a BN step counter has no detkit counterpart when detkit's norm is FrozenBN
            if not (key.endswith(".num_batches_tracked") and target is not None):
                leftover.append(source_prefix + key)
            continue
        if target in out:
            raise ConversionError(f"{part}: two transformers keys map to detkit key {target!r}")
        if tuple(state[key].shape) != tuple(expected[target].shape):
            mismatched.append(f"{source_prefix}{key}: {tuple(state[key].shape)} vs detkit {target} "
                              f"{tuple(expected[target].shape)}")
        out[target] = state[key]
    for key in expected:   # frozen-BN checkpoints carry no step counters
        if key not in out and key.endswith(".num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in out]
    if leftover or missing or mismatched:
        problems = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                    for name, keys in (("transformers keys left over", leftover),
                                       ("detkit keys missing", missing),
                                       ("shapes differ", mismatched)) if keys]
        raise ConversionError(f"{part} weights do not match the detkit {part}: " + "; ".join(problems))
    return {detkit_prefix + k: v for k, v in out.items()}


def _meta_state(build: Callable[[], Any]) -> tuple[Any, dict[str, Tensor]]:
    # shapes only (no memory, no initialisation cost); the backbone's "FrozenBN without weights"
    # advice does not apply to a module that is about to receive converted weights
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = build()
    return module, module.state_dict()


def _build_backbone(config: Any) -> tuple[Any, dict[str, Tensor]]:
    cfg = backbone_config(config)
    return _meta_state(lambda: BACKBONES.build(cfg, "backbone"))


def convert_backbone(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """``backbone.*`` detkit entries from the ``model.backbone.model.*`` transformers keys."""
    backbone, expected = _build_backbone(config)
    kind = _field(_field(config, "backbone_config"), "model_type")
    rename = _resnet_vd_key if kind == "rt_detr_resnet" else _hgnetv2_key
    sources = [k[len(BACKBONE_PREFIX):] for k in state if k.startswith(BACKBONE_PREFIX)]
    # transformers keeps the stages after the last output; detkit does not build them
    unused = tuple(f"encoder.stages.{i}." for i in range(backbone.num_stages, 4))
    sources = [k for k in sources if not k.startswith(unused)]
    relative = {k: state[BACKBONE_PREFIX + k] for k in sources}
    return _strict_rename(relative, sources, rename, expected, "backbone", BACKBONE_PREFIX, "backbone.")


def convert_encoder(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """``neck.*`` detkit entries from ``model.encoder_input_proj.*`` and ``model.encoder.*``."""
    backbone, _ = _build_backbone(config)
    cfg = encoder_config(config)
    _, expected = _meta_state(lambda: NECKS.build(cfg, "neck", input_shapes=backbone.output_shape()))
    d_fine = _field(config, "model_type") == "d_fine"
    relative = {k[len("model."):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    return _strict_rename(relative, list(relative), lambda k: _encoder_key(k, d_fine), expected,
                          "encoder", "model.", "neck.")


def convert_backbone_and_encoder(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """Both of the above: every ``backbone.*`` and ``neck.*`` entry of the detkit state dict."""
    return {**convert_backbone(state, config), **convert_encoder(state, config)}
