"""MobileNetV3 feature extractor on torchvision's ``mobilenet_v3_large`` / ``_small``.

Keeps torchvision's ``features`` submodule (``classifier`` dropped), so torchvision state dicts
load by key. cK is the last feature block at stride 2^K (c2..c5; c5 includes the final 1x1 conv,
960 / 576 channels); output cK is Float[B,C_K,ceil(H/2^K),ceil(W/2^K)].
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torchvision
from torch import Tensor, nn

from ...errors import warn_once
from ...registry import BACKBONES
from ...structures import ShapeSpec
from ..layers.frozen_bn import freeze_batch_norm
from ..pretrained import download_torchvision_weights
from ..utils import load_state_dict_checked

__all__ = ["MobileNetV3"]

_ARCHS = {"mobilenet_v3_large": "MobileNet_V3_Large_Weights",
          "mobilenet_v3_small": "MobileNet_V3_Small_Weights"}


@BACKBONES.register()
class MobileNetV3(nn.Module):
    """Args: arch (``mobilenet_v3_large``/``_small``), out_features (c2..c5), norm (``BN`` or
    ``FrozenBN``), weights (None, a torchvision name such as ``IMAGENET1K_V1``, or a local file)."""

    def __init__(self, *, arch: str = "mobilenet_v3_large",
                 out_features: Sequence[str] = ("c3", "c4", "c5"), norm: str = "BN",
                 weights: str | None = None):
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"MobileNetV3: arch must be one of {list(_ARCHS)}, got '{arch}'")
        if norm not in ("BN", "FrozenBN"):
            raise ValueError(f"MobileNetV3: norm must be BN or FrozenBN, got '{norm}'")
        valid = ("c2", "c3", "c4", "c5")
        if not out_features or any(f not in valid for f in out_features):
            raise ValueError(f"MobileNetV3: out_features must be a subset of {list(valid)}, got "
                             f"{list(out_features)}")
        self.arch, self.out_features = arch, sorted(out_features)
        self.features = getattr(torchvision.models, arch)(weights=None).features
        self._index, self._shapes = self._locate_levels()
        if weights is not None:
            self._load(weights)
        elif norm == "FrozenBN":
            warn_once("MobileNetV3: norm FrozenBN with weights: null keeps identity statistics, so nothing "
                      "normalises the activations and training from scratch tends to diverge (NaN loss); "
                      "set norm: BN (--set model.backbone.norm=BN) or give pretrained weights")
        if norm == "FrozenBN":
            freeze_batch_norm(self)

    @torch.no_grad()
    def _locate_levels(self) -> tuple[dict[int, str], dict[str, ShapeSpec]]:
        """Map the last block index of each stride to its cK name, by a tiny dry run."""
        was_training = self.training
        self.eval()
        x, size, last = torch.zeros(1, 3, 64, 64), 64, {}
        for i, block in enumerate(self.features):
            x = block(x)
            stride = size // x.shape[-1]
            last[f"c{stride.bit_length() - 1}"] = (i, x.shape[1], stride)
        self.train(was_training)
        index = {last[n][0]: n for n in self.out_features}
        shapes = {n: ShapeSpec(last[n][1], last[n][2]) for n in self.out_features}
        return index, shapes

    def _load(self, weights: str) -> None:
        if os.path.isfile(weights):
            state, source = torch.load(weights, map_location="cpu", weights_only=True), weights
            state = state.get("model", state) if isinstance(state, dict) else state
        else:
            source = f"torchvision {_ARCHS[self.arch]}.{weights}"
            try:
                weights_enum = torchvision.models.get_weight(f"{_ARCHS[self.arch]}.{weights}")
            except Exception as e:
                raise ValueError(f"MobileNetV3: cannot load weights '{weights}' (not a file; {source}: "
                                 f"{e})") from e
            state = download_torchvision_weights(weights_enum, owner="MobileNetV3")
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        load_state_dict_checked(self, state, strict=True, source=source)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Float[B,3,H,W] -> {cK: Float[B,C_K,ceil(H/2^K),ceil(W/2^K)]}."""
        outputs, last = {}, max(self._index)
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._index:
                outputs[self._index[i]] = x
            if i == last:
                break
        return outputs
