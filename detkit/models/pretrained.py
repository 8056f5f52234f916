"""Backbone weights from a local file, including detkit's self-supervised pre-training checkpoints.

``read_backbone_weights(path, backbone)`` accepts a bare state dict, a ``{model|state_dict: ...}``
checkpoint, or a checkpoint written by ``tools/pretrain.py``: its ``meta.ssl`` names the method,
the backbone class and the state-dict prefix of the encoder the method transfers (MoCo's query
encoder, BYOL's online network, DINO's teacher ...); those tensors are returned with the prefix
removed, and what was loaded is reported on the main process.

``download_torchvision_weights(weights, owner=, norm=)`` fetches a torchvision weights enum; a
failed download (offline, proxy, broken cache) is one :class:`PretrainedWeightsError` line that
says how to train without it (``--set model.backbone.weights=null``, plus ``norm=BN`` for a
FrozenBN backbone, whose fixed statistics only make sense when they are pretrained).
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import DetkitError

__all__ = ["read_backbone_weights", "download_torchvision_weights", "PretrainedWeightsError"]


class PretrainedWeightsError(DetkitError):
    """Pretrained backbone weights could not be downloaded; the message says how to do without."""


def download_torchvision_weights(weights, *, owner: str, norm: str | None = None,
                                 where: str = "model.backbone") -> dict:
    """``weights.get_state_dict()`` of a torchvision weights enum member (downloaded once, then
    read from torch's cache); a failure is a PretrainedWeightsError naming the overrides that
    train from scratch instead (``where``: the backbone's key path in the config)."""
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:   # noqa: BLE001 - no network, proxy, refused certificate, corrupt cache
        reason = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}").strip()[:200]
        overrides = f"{where}.weights=null" + (f" {where}.norm=BN" if norm == "FrozenBN" else "")
        why_norm = (" (FrozenBN keeps the statistics of pretrained weights; from scratch they must be "
                    "learnt)" if norm == "FrozenBN" else "")
        raise PretrainedWeightsError(
            f"{owner}: could not download the pretrained weights {weights} from {weights.url} "
            f"({reason}); offline? train from scratch with --set {overrides}{why_norm}, or download "
            f"the file elsewhere and set {where}.weights=/path/to/file.pth") from None


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":   # once per job under torchrun
        print(msg, flush=True)


def read_backbone_weights(path: str, backbone: str) -> dict:
    """The state dict in ``path`` for a backbone of class ``backbone`` (see the module docstring).

    Raises ValueError when the file is a pre-training checkpoint of another backbone class, or
    when its ``meta.ssl`` prefix matches no tensor.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{backbone} weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 - truncated zip, refused pickle ...: all "unreadable"
        raise ValueError(f"cannot read {backbone} weights file {path}: {type(e).__name__}: {e}") from None
    ssl = (state.get("meta") or {}).get("ssl") if isinstance(state, dict) else None
    if isinstance(ssl, dict):
        return _ssl_backbone(state, ssl, path, backbone)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{backbone} weights file {path}: expected a state dict, got {type(state).__name__}")
    return state


def _ssl_backbone(ckpt: dict, ssl: dict, path: str, backbone: str) -> dict:
    method, kind = ssl.get("method", "?"), ssl.get("backbone_type", "?")
    if kind != backbone:
        raise ValueError(f"{path} is a {method} pre-training checkpoint of a {kind} backbone; the model's "
                         f"backbone is {backbone} (pre-train the same backbone type and depth)")
    prefix = str(ssl["backbone_prefix"])
    state = {k[len(prefix):]: v for k, v in (ckpt.get("model") or {}).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no tensors under '{prefix}' (the {method} {ssl.get('backbone_from')}); "
                         f"the checkpoint is damaged or not a detkit pre-training checkpoint")
    _log(f"{backbone} weights: {len(state)} tensors of the {method} {ssl.get('backbone_from')} "
         f"('{prefix}*') from {path} (pre-training iteration {ckpt.get('iter', '?')})")
    return state
