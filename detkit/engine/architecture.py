"""Short names of model architectures, so that a checkpoint of another model is one line.

``OneStageDetector (ResNet-18, CenterNetUpsample, CenterNetHead)``: the detector type, then the
types of its parts in a fixed order (``backbone``, ``neck``, ``rpn``, ``roi_head``, ``mask_head``,
``head``) with a ResNet's depth. :func:`describe_model` names a built model from its modules,
:func:`describe_checkpoint` a checkpoint from the resolved config the trainer stored in it, in the
same words (registered type names are the class names), so the two can be compared.
"""

from __future__ import annotations

from typing import Any

import yaml
from torch import nn

from ..config import load_yaml

__all__ = ["describe_model", "describe_model_config", "describe_checkpoint"]

PARTS = ("backbone", "neck", "rpn", "roi_head", "mask_head", "head")


def _part(kind: str, depth: Any) -> str:
    return f"{kind}-{depth}" if isinstance(depth, int) and not isinstance(depth, bool) else kind


def _join(kind: str, parts: list[str]) -> str:
    return f"{kind} ({', '.join(parts)})" if parts else kind


def describe_model(model: nn.Module) -> str:
    """The architecture of a built model, e.g. ``OneStageDetector (ResNet-18, FPN, YOLOHead)``."""
    parts = []
    for name in PARTS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            parts.append(_part(type(module).__name__, getattr(module, "depth", None)))
    return _join(type(model).__name__, parts)


def describe_model_config(model_cfg: Any) -> str | None:
    """The same name from a ``model`` config section; None when it has no ``type``."""
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("type"), str):
        return None
    parts = []
    for name in PARTS:
        node = model_cfg.get(name)
        if isinstance(node, dict) and isinstance(node.get("type"), str):
            parts.append(_part(node["type"], node.get("depth")))
    return _join(model_cfg["type"], parts)


def describe_checkpoint(ckpt: Any) -> str | None:
    """The architecture of a checkpoint from its stored config (YAML text or a dict); None for a
    bare state dict or a config that does not parse."""
    if not isinstance(ckpt, dict):
        return None
    config = ckpt.get("config")
    if isinstance(config, str):
        try:
            config = load_yaml(config)
        except yaml.YAMLError:
            return None
    return describe_model_config(config.get("model")) if isinstance(config, dict) else None
