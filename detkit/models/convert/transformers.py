"""Hugging Face ``transformers`` model folders -> self-contained detkit checkpoints.

A folder as the Hub serves it (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
optionally ``preprocessor_config.json``) of ``RTDetrForObjectDetection``,
``RTDetrV2ForObjectDetection``, ``DFineForObjectDetection``, ``LwDetrForObjectDetection`` or
``RfDetrForObjectDetection`` becomes::

    {"model": detkit state dict, "config": resolved detkit YAML, "meta": {class_names, ...}}

which ``Predictor(None, OUT.pth)``, ``tools/infer.py``, ``tools/eval.py`` and ``train.load_from``
read. The detkit config is built from ``config.json`` alone (any depth, width, level count, query
count, decoder layers and class count), the test pipeline from the preprocessor config, the class
names from ``id2label``. transformers itself is not needed: fields a ``config.json`` leaves out
take the defaults of :mod:`.hf_defaults`.

Parts: :mod:`.hf_backbones` converts the backbone (ResNet-vd, HGNetv2) and the hybrid encoder,
:mod:`.hf_detr` the decoder head; LW-DETR / RF-DETR take their ViT and projector from
:mod:`.hf_vit` and their ``LWDETRHead`` from :mod:`.hf_lwdetr` (which read both transformers' and
the original RF-DETR key names). This module reads the folder and puts them together.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ...errors import DetkitError
from .hf_defaults import DEFAULT_BACKBONE, HF_DEFAULTS

__all__ = ["from_transformers", "read_model_dir", "detkit_config", "convert_state_dict",
           "ConversionError", "HFConfig", "TRANSFORMERS_ARCHITECTURES"]

# architecture name in config.json -> model_type
TRANSFORMERS_ARCHITECTURES = {"RTDetrForObjectDetection": "rt_detr",
                              "RTDetrV2ForObjectDetection": "rt_detr_v2",
                              "DFineForObjectDetection": "d_fine",
                              "LwDetrForObjectDetection": "lw_detr",     # ViT + projector + LWDETRHead
                              "RfDetrForObjectDetection": "rf_detr"}     # (see .hf_lwdetr)
VIT_DETR_TYPES = ("lw_detr", "rf_detr")


class ConversionError(DetkitError, ValueError):
    """A model folder that detkit cannot convert; the message names the file and the problem."""


class HFConfig(dict):
    """A ``config.json`` mapping with attribute access (``cfg.d_model``), as transformers'
    config objects offer; nested mappings (``backbone_config``) are HFConfigs too."""

    def __init__(self, data: dict):
        super().__init__({k: HFConfig(v) if isinstance(v, dict) and k != "id2label" else v
                          for k, v in data.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _model_type(raw: dict, path: Path) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in TRANSFORMERS_ARCHITECTURES:
            return TRANSFORMERS_ARCHITECTURES[arch]
    if not archs and raw.get("model_type") in HF_DEFAULTS and raw["model_type"] in DEFAULT_BACKBONE:
        return raw["model_type"]
    found = ", ".join(archs) if archs else f"model_type {raw.get('model_type')!r}"
    raise ConversionError(f"{path}: {found} is not an architecture detkit converts; supported: "
                          f"{', '.join(TRANSFORMERS_ARCHITECTURES)}")


def resolve_config(raw: dict, path: Path) -> HFConfig:
    """``config.json`` with the defaults of its architecture (and of its backbone) filled in."""
    model_type = _model_type(raw, path)
    if model_type in VIT_DETR_TYPES:   # .hf_vit / .hf_lwdetr fill transformers' defaults themselves
        return HFConfig(dict(raw, model_type=model_type, id2label=_id2label(raw, path)))
    cfg = dict(HF_DEFAULTS[model_type], **raw)
    cfg["model_type"] = model_type
    backbone = raw.get("backbone_config")
    if backbone is None:
        backbone = copy.deepcopy(DEFAULT_BACKBONE[model_type])
    elif not isinstance(backbone, dict) or backbone.get("model_type") not in HF_DEFAULTS:
        kind = backbone.get("model_type") if isinstance(backbone, dict) else backbone
        raise ConversionError(f"{path}: backbone_config of type {kind!r} is not supported "
                              f"(detkit converts rt_detr_resnet and hgnet_v2 backbones)")
    else:
        backbone = dict(HF_DEFAULTS[backbone["model_type"]], **backbone)
    cfg["backbone_config"] = backbone
    cfg["id2label"] = _id2label(raw, path)
    return HFConfig(cfg)


def _id2label(raw: dict, path: Path) -> dict[int, str]:
    id2label = {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}
    if not id2label:
        raise ConversionError(f"{path}: no id2label: the class count is unknown")
    return id2label


def _read_weights(folder: Path) -> dict[str, Tensor]:
    st, binary = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{st}: not a readable safetensors file: {e}") from None
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a broken file
            raise ConversionError(f"{binary}: not a readable PyTorch state dict: {e}") from None
        if isinstance(state, dict):
            return state
        raise ConversionError(f"{binary}: expected a state dict, got {type(state).__name__}")
    sharded = sorted(p.name for p in folder.glob("model-*.safetensors"))
    hint = f" (sharded files {sharded} are not supported)" if sharded else ""
    raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin{hint}")


def read_model_dir(model_dir: str | os.PathLike) -> tuple[HFConfig, dict[str, Tensor], dict | None]:
    """(resolved config, state dict, preprocessor config or None) of a transformers folder."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder (expected a transformers model folder with "
                              f"config.json and model.safetensors)")
    config = resolve_config(_read_json(folder / "config.json"), folder / "config.json")
    state = _read_weights(folder)
    pre = folder / "preprocessor_config.json"
    return config, state, (_read_json(pre) if pre.is_file() else None)


def test_pipeline(preprocessor: dict | None) -> tuple[list[dict], list[float], list[float]]:
    """(test pipeline, pixel_mean, pixel_std) of an image processor config.

    RT-DETR's processor resizes to a fixed ``size`` (no aspect ratio kept), rescales to [0, 1]
    and by default does not normalise; detkit's test pipeline does the same resize (its boxes are
    mapped back per axis) and the model normalises with ``pixel_mean`` / ``pixel_std``.
    """
    pre = preprocessor or {}
    size = pre.get("size") or {"height": 640, "width": 640}
    if "height" in size and "width" in size:
        pipeline = [{"type": "Resize", "height": int(size["height"]), "width": int(size["width"])}]
    elif "shortest_edge" in size:
        pipeline = [{"type": "ResizeShortestEdge", "short_edge": int(size["shortest_edge"]),
                     "max_size": int(size.get("longest_edge", 1333))}]
    else:
        raise ConversionError(f"preprocessor_config.json: size {size} is not a fixed "
                              f"height/width or a shortest_edge")
    if pre.get("do_resize") is False:
        pipeline = []
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if pre.get("do_normalize"):
        mean = [float(v) for v in pre.get("image_mean", [0.485, 0.456, 0.406])]
        std = [float(v) for v in pre.get("image_std", [0.229, 0.224, 0.225])]
    return pipeline, mean, std


def detkit_config(config: HFConfig, preprocessor: dict | None = None) -> dict:
    """The detkit config (``model``, ``data.val.pipeline`` — the pipeline ``Predictor`` applies —
    and ``data.class_names``) equivalent to a transformers one."""
    from .hf_backbones import backbone_config, encoder_config
    from .hf_detr import head_config

    pipeline, mean, std = test_pipeline(preprocessor)
    if config.model_type in VIT_DETR_TYPES:
        from .hf_lwdetr import lwdetr_model_parts

        try:
            parts = lwdetr_model_parts(config)
        except (KeyError, ValueError) as e:
            raise ConversionError(f"config.json: {e}") from None
        model = {"type": "DETRDetector", "num_classes": len(config.id2label),
                 "pixel_mean": mean, "pixel_std": std, **parts}
        return {"model": model, "data": {"class_names": class_names(config), "val": {"pipeline": pipeline}}}
    model = {"type": "DETRDetector", "num_classes": len(config.id2label),
             "pixel_mean": mean, "pixel_std": std, "size_divisibility": 32,
             "backbone": backbone_config(config),
             "neck": encoder_config(config),
             "head": head_config(config)}
    return {"model": model, "data": {"class_names": class_names(config),
                                      "val": {"pipeline": pipeline}}}


def class_names(config: HFConfig) -> list[str]:
    labels = config.id2label
    missing = sorted(set(range(len(labels))) - set(labels))
    if missing:
        raise ConversionError(f"config.json: id2label has no entry for labels {missing[:5]}")
    return [labels[i] for i in range(len(labels))]


def convert_state_dict(state: dict[str, Tensor], config: HFConfig) -> dict[str, Tensor]:
    """The detkit state dict of a transformers ``...ForObjectDetection`` state dict (strict: a
    key left over or missing is a ConversionError naming it)."""
    from .hf_backbones import convert_backbone_and_encoder
    from .hf_detr import convert_head

    try:
        if config.model_type in VIT_DETR_TYPES:
            from .hf_lwdetr import convert_lwdetr_state_dict

            return convert_lwdetr_state_dict(state, config)
        out = dict(convert_backbone_and_encoder(state, config))
        out.update(convert_head(state, config))
    except (KeyError, ValueError) as e:
        raise ConversionError(f"model weights do not match config.json: {e}") from None
    return out


def from_transformers(model_dir: str | os.PathLike) -> dict:
    """A self-contained detkit checkpoint ``{"model", "config", "meta"}`` from a transformers
    model folder; raises ConversionError (one clear message) for what it cannot convert."""
    config, state, preprocessor = read_model_dir(model_dir)
    cfg = detkit_config(config, preprocessor)
    converted = convert_state_dict(state, config)
    names = cfg["data"]["class_names"]
    meta = {"converted_from": str(model_dir), "arch": config.get("architectures", [None])[0]
            or config.model_type, "class_names": names}
    return {"model": converted, "config": yaml.safe_dump(cfg, sort_keys=False), "meta": meta}
