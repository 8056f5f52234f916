"""Darknet-53, YOLOv3's backbone, with width / depth multipliers.

Layout (full size): stem 3x3 conv (32) then five stages, each a 3x3 stride-2 conv followed by
residual blocks (1x1 conv to half the channels -> 3x3 conv back, added to the input):

    stage  output  stride  channels  blocks
    1      c1      2       64        1
    2      c2      4       128       2
    3      c3      8       256       8
    4      c4      16      512       8
    5      c5      32      1024      4

All convs are ConvNormAct(BN, LeakyReLU 0.1). ``width_mult`` scales channels (rounded to a
multiple of 8, at least 8), ``depth_mult`` scales block counts (rounded, at least 1), so
``width_mult=0.25, depth_mult=0.33`` gives a tiny network for CPU tests. Output cK is
Float[B,C_K,ceil(H/2^K),ceil(W/2^K)].
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ...registry import BACKBONES
from ...structures import ShapeSpec
from ..layers.conv import ConvNormAct
from ..pretrained import read_backbone_weights
from ..utils import load_state_dict_checked
from ._frozen import FrozenStagesBackbone

__all__ = ["Darknet53", "DarknetBottleneck"]

_CHANNELS = (64, 128, 256, 512, 1024)
_BLOCKS = (1, 2, 8, 8, 4)
_STAGES = ("c1", "c2", "c3", "c4", "c5")


def scale_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """``channels * width_mult`` rounded to the nearest multiple of ``divisor`` (>= divisor)."""
    return max(divisor, int(round(channels * width_mult / divisor)) * divisor)


class DarknetBottleneck(nn.Module):
    """x + conv3x3(conv1x1(x)), the 1x1 halving the channels; Float[B,C,H,W] -> same shape."""

    def __init__(self, channels: int, *, norm: str = "BN", act: str = "leaky_relu"):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels // 2, 1, norm=norm, act=act)
        self.conv2 = ConvNormAct(channels // 2, channels, 3, norm=norm, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


@BACKBONES.register()
class Darknet53(FrozenStagesBackbone):
    """Darknet-53 feature extractor returning ``out_features`` (any of c1..c5; default c3..c5).

    Args:
        width_mult / depth_mult: channel and block-count multipliers (1.0 = the paper's net).
        norm / act: ConvNormAct names (default BN + LeakyReLU(0.1)).
        frozen_stages: -1 trains everything; k >= 0 freezes the stem and stages 1..k.
        weights: None or a local state-dict file (for this class's own key names).
    """

    def __init__(self, *, out_features: Sequence[str] = ("c3", "c4", "c5"), width_mult: float = 1.0,
                 depth_mult: float = 1.0, norm: str = "BN", act: str = "leaky_relu",
                 frozen_stages: int = -1, weights: str | None = None):
        super().__init__()
        out_features = list(out_features)
        if not out_features or any(f not in _STAGES for f in out_features):
            raise ValueError(f"Darknet53: out_features must be a non-empty subset of {list(_STAGES)}, "
                             f"got {out_features}")
        if width_mult <= 0 or depth_mult <= 0:
            raise ValueError(f"Darknet53: width_mult and depth_mult must be > 0, got "
                             f"{width_mult}, {depth_mult}")
        self.out_features = sorted(out_features, key=_STAGES.index)
        self.frozen_stages = int(frozen_stages)
        stem_channels = scale_channels(32, width_mult)
        self.stem = ConvNormAct(3, stem_channels, 3, norm=norm, act=act)
        self.num_stages = _STAGES.index(self.out_features[-1]) + 1
        self._channels = {}
        in_ch = stem_channels
        for i in range(self.num_stages):
            out_ch = scale_channels(_CHANNELS[i], width_mult)
            blocks = max(1, int(round(_BLOCKS[i] * depth_mult)))
            layers: list[nn.Module] = [ConvNormAct(in_ch, out_ch, 3, stride=2, norm=norm, act=act)]
            layers += [DarknetBottleneck(out_ch, norm=norm, act=act) for _ in range(blocks)]
            setattr(self, f"stage{i + 1}", nn.Sequential(*layers))
            self._channels[_STAGES[i]] = in_ch = out_ch
        if weights is not None:
            self.load_weights(weights)
        self.freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        n = min(self.frozen_stages, self.num_stages)
        return [self.stem] + [getattr(self, f"stage{i}") for i in range(1, n + 1)]

    def load_weights(self, path: str) -> None:
        # a state dict, a checkpoint, or a tools/pretrain.py checkpoint (its transferred encoder)
        state = read_backbone_weights(path, "Darknet53")
        load_state_dict_checked(self, state, strict=True, source=path)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(self._channels[n], 2 ** (_STAGES.index(n) + 1)) for n in self.out_features}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Float[B,3,H,W] -> {cK: Float[B,C_K,ceil(H/2^K),ceil(W/2^K)]} for ``out_features``."""
        x = self.stem(x)
        outputs = {}
        for i in range(self.num_stages):
            x = getattr(self, f"stage{i + 1}")(x)
            if _STAGES[i] in self.out_features:
                outputs[_STAGES[i]] = x
        return outputs
