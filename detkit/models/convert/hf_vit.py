"""transformers ViT backbones and RF-DETR / LW-DETR projectors -> detkit ``ViT`` / ``RFDETRProjector``.

Config builders (``config``: a transformers config object or a ``config.json`` mapping such as
:class:`.transformers.HFConfig`; fields it omits take transformers' defaults):

* ``vit_backbone_config(config, out_indices=None)``: the ``ViT`` node of a ``dinov2``,
  ``dinov2_with_registers``, ``rf_detr_dinov2`` or ``lw_detr_vit`` config (the backbone config
  itself, or an ``rf_detr`` / ``lw_detr`` config, whose ``backbone_config`` is used). Blocks
  after the deepest output are not built (detection never runs them).
* ``projector_config(config)``: the ``RFDETRProjector`` node of an ``rf_detr`` / ``lw_detr`` config.

State-dict converters, strict: every source key under the part's prefix is used exactly once or
skipped for one of the documented reasons below; any other key is a :class:`ConversionError`
naming it, as is a detkit tensor no source key fills. Both the names of transformers >= 5
(``attention.q_proj``, ``mlp.gate_proj``) and the Hub's older ones (``attention.attention.query``,
``attention.output.dense``, fused ``mlp.weights_in``, RF-DETR's ``projector.stages.0.0.cv1``) are
read. Skipped on purpose: blocks deeper than the detkit ``depth``, ``mask_token`` when the target
has none, the final ``layernorm`` when the target has ``final_norm: false``, LW-DETR's unused CLS
slot of the position embeddings, and an image-classification ``classifier``.

* ``convert_vit(state, config, prefix="backbone.", target=None)``
* ``convert_projector(state, config, prefix="neck.")``
* ``convert_vit_parts(state, config)``: both, from an ``RfDetr`` / ``LwDetr`` ``Model`` or
  ``ForObjectDetection`` state dict (the keys under ``[model.]backbone.``).
* ``read_dinov2_folder(folder, prefix="backbone.", target=None)``: a ``Dinov2Model`` folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .transformers import ConversionError, HFConfig, _read_json, _read_weights

__all__ = ["vit_backbone_config", "projector_config", "convert_vit", "convert_projector",
           "convert_vit_parts", "read_dinov2_folder", "VIT_MODEL_TYPES"]

_DINOV2 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
               layer_norm_eps=1e-6, image_size=224, patch_size=14, qkv_bias=True, layerscale_value=1.0,
               use_swiglu_ffn=False, apply_layernorm=True, use_mask_token=True, num_register_tokens=0)
VIT_MODEL_TYPES: dict[str, dict[str, Any]] = {
    "dinov2": _DINOV2,
    "dinov2_with_registers": dict(_DINOV2, patch_size=16, num_register_tokens=4),
    "rf_detr_dinov2": dict(_DINOV2, layerscale_value=1.0, num_windows=4),
    "lw_detr_vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                        hidden_act="gelu", layer_norm_eps=1e-6, pretrain_image_size=224, patch_size=16,
                        qkv_bias=True, window_block_indices=[], use_absolute_position_embeddings=True,
                        cae_init_values=0.1, num_windows=16),
}
# the backbone an rf_detr / lw_detr config.json gets when it has no backbone_config
_DEFAULT_BACKBONES = {
    "rf_detr": dict(model_type="rf_detr_dinov2", num_attention_heads=6, hidden_size=384,
                    out_features=["stage2", "stage5", "stage8", "stage11"], image_size=518),
    "lw_detr": dict(model_type="lw_detr_vit", image_size=1024, hidden_size=192, num_hidden_layers=10,
                    window_block_indices=[0, 1, 3, 6, 7, 9], out_indices=[2, 4, 5, 9]),
}
_DETR_DEFAULTS = {"d_model": 256, "hidden_expansion": 0.5, "c2f_num_blocks": 3, "activation_function": "silu",
                  "layer_norm_eps": 1e-5, "batch_norm_eps": 1e-5, "projector_scale_factors": []}
def _as_mapping(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise ConversionError(f"expected a transformers config or a config.json mapping, "
                          f"got {type(config).__name__}")


def _backbone_mapping(config: Any) -> dict:
    """The ViT config (with its type's defaults) of a backbone config or an RF-/LW-DETR config."""
    raw = _as_mapping(config)
    model_type = raw.get("model_type")
    if model_type in _DEFAULT_BACKBONES:
        backbone = raw.get("backbone_config")
        raw = _as_mapping(backbone) if backbone is not None else dict(_DEFAULT_BACKBONES[model_type])
        model_type = raw.get("model_type")
    if model_type not in VIT_MODEL_TYPES:
        raise ConversionError(f"config model_type {model_type!r} is not a ViT detkit converts; supported: "
                              f"{', '.join(VIT_MODEL_TYPES)} (or rf_detr / lw_detr with one of them)")
    return HFConfig(dict(VIT_MODEL_TYPES[model_type], **raw))


def _scalar(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"config {name} {list(value)}: detkit's ViT takes square patches / images")
        value = value[0]
    return int(value)


def _out_indices(cfg: Mapping, override: Any) -> list[int]:
    if override is not None:
        return sorted(int(i) for i in override)
    indices = cfg.get("out_indices") or cfg.get("_out_indices")
    names = cfg.get("out_features") or cfg.get("_out_features") or []
    if not indices and names:
        indices = [0 if n == "stem" else int(str(n).removeprefix("stage")) for n in names]
    return sorted(int(i) for i in indices) if indices else [int(cfg["num_hidden_layers"])]


def vit_backbone_config(config: Any, *, out_indices: Any = None) -> dict:
    """The detkit ``ViT`` config node of a transformers ViT (or RF-/LW-DETR) config."""
    cfg = _backbone_mapping(config)
    outs = _out_indices(cfg, out_indices)
    bad = [i for i in outs if not 0 <= i <= int(cfg["num_hidden_layers"])]
    if bad:
        raise ConversionError(f"config out_indices {outs}: {bad} outside 0..num_hidden_layers="
                              f"{cfg['num_hidden_layers']}")
    node: dict[str, Any] = dict(
        type="ViT", patch_size=_scalar(cfg["patch_size"], "patch_size"), embed_dim=int(cfg["hidden_size"]),
        depth=max(outs), num_heads=int(cfg["num_attention_heads"]), mlp_ratio=float(cfg["mlp_ratio"]),
        out_indices=outs, act=str(cfg["hidden_act"]), qkv_bias=bool(cfg["qkv_bias"]),
        layer_norm_eps=float(cfg["layer_norm_eps"]))
    if cfg["model_type"] == "lw_detr_vit":
        if not cfg["use_absolute_position_embeddings"]:
            raise ConversionError("config use_absolute_position_embeddings=false is not supported")
        side = math.isqrt(int(cfg["num_windows"]))
        if side * side != int(cfg["num_windows"]):
            raise ConversionError(f"config num_windows {cfg['num_windows']} is not a perfect square")
        windowed = [int(i) for i in cfg["window_block_indices"] if int(i) < max(outs)]
        node.update(pretrain_image_size=_scalar(cfg["pretrain_image_size"], "pretrain_image_size"),
                    cls_token=False, key_bias=False, layer_scale_init=float(cfg["cae_init_values"]),
                    final_norm=False, windows_per_side=side, window_block_indices=windowed)
        return node
    node.update(pretrain_image_size=_scalar(cfg["image_size"], "image_size"),
                num_register_tokens=int(cfg["num_register_tokens"]),
                pos_embed_antialias=cfg["model_type"] != "dinov2",
                ffn="swiglu" if cfg["use_swiglu_ffn"] else "mlp",
                layer_scale_init=float(cfg["layerscale_value"]),
                final_norm=bool(cfg["apply_layernorm"]))
    if cfg["model_type"] == "rf_detr_dinov2" and int(cfg["num_windows"]) > 1:
        # transformers' rule: blocks up to the deepest output window, except the output blocks
        windowed = sorted(set(range(max(outs) + 1)) - set(outs))
        node.update(windows_per_side=int(cfg["num_windows"]), window_block_indices=[i for i in windowed
                                                                                     if i < max(outs)])
    return node


def projector_config(config: Any) -> dict:
    """The detkit ``RFDETRProjector`` node of an ``rf_detr`` / ``lw_detr`` config (``input_shapes`` comes
    from the backbone at build time)."""
    raw = _as_mapping(config)
    kind = raw.get("model_type")
    if kind not in _DEFAULT_BACKBONES:
        raise ConversionError(f"config model_type {kind!r}: a projector needs an rf_detr or lw_detr config")
    cfg = dict(_DETR_DEFAULTS, **raw)
    outs = vit_backbone_config(config)["out_indices"]
    node: dict[str, Any] = dict(type="RFDETRProjector", in_features=[f"stage{i}" for i in outs],
                                out_channels=int(cfg["d_model"]), num_blocks=int(cfg["c2f_num_blocks"]),
                                hidden_expansion=float(cfg["hidden_expansion"]), out_norm_eps=1e-6,
                                act=str(cfg["activation_function"]))
    if kind == "rf_detr":
        node.update(scale_factors=[1.0], norm="LN", norm_eps=float(cfg["layer_norm_eps"]))
    else:
        factors = [float(f) for f in cfg["projector_scale_factors"]]
        if not factors:
            raise ConversionError("lw_detr config has no projector_scale_factors: no feature level to build")
        node.update(scale_factors=factors, norm="BN", norm_eps=float(cfg["batch_norm_eps"]))
    return node


# ----------------------------------------------------------------------------------- key rules
# where a part sits in the state dicts converted: transformers' RF-/LW-DETR (ForObjectDetection /
# Model), the original RF-DETR repository, an image-classification model, a bare backbone
_VIT_SOURCES = ("model.backbone.backbone.", "backbone.backbone.", "backbone.0.encoder.encoder.", "dinov2.",
                "dinov2_with_registers.", "")
_PROJECTOR_SOURCES = ("model.backbone.", "backbone.0.", "backbone.", "")
_BLOCK_RULES = [(re.compile(p), r) for p, r in [
    (r"^(norm1|layernorm_before)\.", "norm1."), (r"^(norm2|layernorm_after)\.", "norm2."),
    (r"^attention\.(q|k|v|o)_proj\.", r"attn.\1_proj."),
    (r"^attention\.attention\.query\.", "attn.q_proj."), (r"^attention\.attention\.key\.", "attn.k_proj."),
    (r"^attention\.attention\.value\.", "attn.v_proj."),
    (r"^attention\.output\.(dense\.)?", "attn.o_proj."),
    (r"^layer_scale1\.lambda1$", "ls1.gamma"), (r"^layer_scale2\.lambda1$", "ls2.gamma"),
    (r"^gamma_1$", "ls1.gamma"), (r"^gamma_2$", "ls2.gamma"),
    (r"^(mlp|intermediate)\.(fc1|fc2)\.", r"ffn.\2."),
    (r"^mlp\.(gate_proj|up_proj|down_proj)\.", r"ffn.\1."), (r"^mlp\.weights_out\.", "ffn.down_proj."),
]]
_EMBED_RULES = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "register_tokens",
                "embeddings.mask_token": "mask_token", "embeddings.patch_embeddings.projection.weight":
                "patch_embed.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
                "embeddings.projection.weight": "patch_embed.weight",
                "embeddings.projection.bias": "patch_embed.bias",
                "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def _vit_key(key: str, value: Tensor, node: dict) -> tuple[dict[str, Tensor], str | None]:
    """({detkit key: tensor}, skip reason or None) of one source key relative to the ViT root."""
    if key == "embeddings.position_embeddings":
        out = {"pos_embed": value[:, 1:]}
        if node.get("cls_token", True):
            out["cls_pos_embed"] = value[:, :1]
        return out, None
    if key == "embeddings.mask_token" and not node.get("use_mask_token", False):
        return {}, "mask token (only masked-image pre-training uses it)"
    if key.startswith("layernorm.") and not node.get("final_norm", True):
        return {}, "final layernorm (final_norm is false)"
    if key in _EMBED_RULES:
        return {_EMBED_RULES[key]: value}, None
    m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key)
    if m is None:
        return {}, None
    index, rest = int(m.group(1)), m.group(2)
    if index >= int(node["depth"]):
        return {}, f"block {index} (deeper than the last output)"
    if rest.startswith("mlp.weights_in."):   # the Hub's fused SwiGLU input: gate rows, then up rows
        gate, up = value.chunk(2, dim=0)
        tail = rest.removeprefix("mlp.weights_in.")
        return {f"blocks.{index}.ffn.gate_proj.{tail}": gate, f"blocks.{index}.ffn.up_proj.{tail}": up}, None
    for pattern, repl in _BLOCK_RULES:
        if pattern.match(rest):
            target = pattern.sub(repl, rest, count=1).replace("attn.o_proj.", "attn.out_proj.")
            return {f"blocks.{index}.{target}": value}, None
    return {}, None


def _source_prefix(state: Mapping[str, Tensor], candidates: tuple[str, ...], marker: str, what: str) -> str:
    for p in candidates:
        if any(k.startswith(p + marker) for k in state):
            return p
    raise ConversionError(f"no {what} tensors in the state dict (looked for keys starting with "
                          f"{', '.join(repr(c + marker) for c in candidates)})")


def _expected_keys(node: dict) -> set[str]:
    """The state-dict keys of the detkit module a config node builds (on the meta device)."""
    from ...registry import BACKBONES, NECKS

    kwargs = {k: v for k, v in node.items() if k != "type"}
    registry = BACKBONES if node["type"] == "ViT" else NECKS
    with torch.device("meta"):
        return set(registry.get(node["type"])(**kwargs).state_dict())


def _finish(out: dict[str, Tensor], unknown: list[str], node: dict, prefix: str,
            what: str) -> dict[str, Tensor]:
    if unknown:
        raise ConversionError(f"{what}: {len(unknown)} source key(s) no rule converts: "
                              f"{', '.join(unknown[:8])}")
    expected = _expected_keys(node)
    missing = sorted(expected - set(out))
    extra = sorted(set(out) - expected)
    if missing or extra:
        raise ConversionError(f"{what}: the converted tensors do not match the detkit module: missing "
                              f"{missing[:8]}, not in the module {extra[:8]}")
    return {prefix + k: v for k, v in out.items()}


def _put(out: dict[str, Tensor], new: dict[str, Tensor], source: str, what: str) -> None:
    for k, v in new.items():
        if k in out:
            raise ConversionError(f"{what}: '{source}' fills '{k}', which another source key already filled "
                                  f"(both the old and the new transformers names present?)")
        out[k] = v


def convert_vit(state: Mapping[str, Tensor], config: Any, *, prefix: str = "backbone.",
                target: dict | None = None) -> dict[str, Tensor]:
    """A transformers ViT state dict (any of :data:`VIT_MODEL_TYPES`, alone or inside an RF-/LW-DETR
    or classification model) -> detkit ``ViT`` keys under ``prefix``. ``target`` overrides fields
    of the ViT node the config gives (``depth``, ``use_mask_token``, ``final_norm`` ...)."""
    node = dict(vit_backbone_config(config), **(target or {}))
    src = _source_prefix(state, _VIT_SOURCES, "embeddings.", "ViT")
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith(src) or (src == "" and key.startswith("classifier.")):
            continue
        new, skipped = _vit_key(key[len(src):], value, node)
        if not new and skipped is None:
            unknown.append(key)
        _put(out, new, key, "ViT")
    return _finish(out, unknown, node, prefix, "ViT")


def _c2f_key(rest: str, *, legacy: bool) -> str | None:
    """A C2f / LayerNorm key -> detkit ``fuse.*`` / ``norm.*``; ``legacy``: the original RF-DETR's
    names inside ``stages.{j}.`` (``0.cv1.bn``, ``0.m.{k}.cv2.conv``, ``1.`` for the LayerNorm)."""
    if legacy:
        rules = [(r"^0\.cv(1|2)\.(conv|bn)\.", "fuse.conv{0}.{1}."),
                 (r"^0\.m\.(\d+)\.cv(1|2)\.(conv|bn)\.", "fuse.blocks.{0}.{1}.{2}."),
                 (r"^1\.", "norm.")]
    else:
        rules = [(r"^projector_layer\.conv(1|2)\.(conv|norm)\.", "fuse.conv{0}.{1}."),
                 (r"^projector_layer\.bottlenecks\.(\d+)\.conv(1|2)\.(conv|norm)\.",
                  "fuse.blocks.{0}.{1}.{2}."),
                 (r"^layer_norm\.", "norm.")]
    for pattern, repl in rules:
        m = re.match(pattern, rest)
        if m:
            groups = list(m.groups())
            if "blocks" in repl:   # detkit numbers a block's two convs 0 and 1
                groups[1] = str(int(groups[1]) - 1)
            return repl.format(*["norm" if g == "bn" else g for g in groups]) + rest[m.end():]
    return None


def _projector_key(key: str) -> str | None:
    """A projector key relative to ``backbone.projector.`` -> detkit ``levels.{j}.*``."""
    m = re.match(r"^scale_layers\.(\d+)\.(.+)$", key)     # LW-DETR: one entry per level
    if m:
        level, rest = m.group(1), m.group(2)
        s = re.match(r"^sampling_layers\.(\d+)\.layers\.(.+)$", rest)
        if s:
            return f"levels.{level}.samplers.{s.group(1)}.{s.group(2)}"
        c2f = _c2f_key(rest, legacy=False)
        return None if c2f is None else f"levels.{level}.{c2f}"
    m = re.match(r"^stages\.(\d+)\.(.+)$", key)           # original RF-DETR: stages.j = (C2f, LN)
    if m:
        c2f = _c2f_key(m.group(2), legacy=True)
        return None if c2f is None else f"levels.{m.group(1)}.{c2f}"
    c2f = _c2f_key(key, legacy=False)                       # transformers RF-DETR: one level
    return None if c2f is None else f"levels.0.{c2f}"


def convert_projector(state: Mapping[str, Tensor], config: Any, *,
                      prefix: str = "neck.") -> dict[str, Tensor]:
    """The projector tensors of an RF-/LW-DETR state dict -> detkit ``RFDETRProjector`` keys under
    ``prefix``."""
    node = projector_config(config)
    src = _source_prefix(state, _PROJECTOR_SOURCES, "projector.", "projector")
    src += "projector."
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith(src):
            continue
        new = _projector_key(key[len(src):])
        if new is None:
            unknown.append(key)
            continue
        _put(out, {new: value}, key, "projector")
    vit = vit_backbone_config(config)
    node = dict(node, input_shapes=_vit_shapes(vit))
    return _finish(out, unknown, node, prefix, "projector")


def _vit_shapes(vit: dict) -> dict:
    from ...structures import ShapeSpec

    return {f"stage{i}": ShapeSpec(vit["embed_dim"], vit["patch_size"]) for i in vit["out_indices"]}


def convert_vit_parts(state: Mapping[str, Tensor], config: Any, *, backbone_prefix: str = "backbone.",
                      neck_prefix: str = "neck.") -> dict[str, Tensor]:
    """Backbone and projector of an RF-/LW-DETR state dict (``...Model`` or ``...ForObjectDetection``);
    the other keys (the decoder's) are left to the head converter."""
    return {**convert_vit(state, config, prefix=backbone_prefix),
            **convert_projector(state, config, prefix=neck_prefix)}


def read_dinov2_folder(folder: str | Path, *, prefix: str = "backbone.", target: dict | None = None,
                       out_indices: Any = None) -> dict[str, Tensor]:
    """The detkit ``ViT`` state dict of a transformers ``Dinov2Model`` (or with registers, or an
    image-classification model on one) folder: ``config.json`` + ``model.safetensors`` /
    ``pytorch_model.bin``. Every tensor is used (or skipped for a reason in the module doc)."""
    path = Path(folder)
    config = HFConfig(_read_json(path / "config.json"))
    state = _read_weights(path)
    try:
        node = dict(vit_backbone_config(config, out_indices=out_indices), **(target or {}))
        return convert_vit(state, config, prefix=prefix, target=node)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
