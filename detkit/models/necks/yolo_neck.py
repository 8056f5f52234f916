"""YOLOv3Neck: YOLOv3's top-down neck (upsample + concat + five-conv blocks), optional SPP.

Inputs c3, c4, c5 (strides 8, 16, 32; Darknet-53 channels 256, 512, 1024) -> outputs p3, p4, p5
at the same strides with ``out_channels`` (default half the input channels: 128, 256, 512).
From the deepest level up:

    p5 = block5(c5)
    p4 = block4(concat[c4, up2(1x1(p5))])        # 1x1 to p4's channels, nearest upsample
    p3 = block3(concat[c3, up2(1x1(p4))])

A block is 1x1(o) -> 3x3(2o) -> 1x1(o) -> 3x3(2o) -> 1x1(o); with ``spp=True`` (YOLOv3-SPP) the
deepest block has [x, maxpool 5, 9, 13] + 1x1(o) after its third conv. The 3x3(2o) + prediction
convs of each level belong to the head. Upsampling goes to the lateral's exact size, so input
sizes not divisible by 32 work.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import NECKS
from ...structures import ShapeSpec
from ..layers.conv import ConvNormAct
from .fpn import level_name
from .spp import SpatialPyramidPooling

__all__ = ["YOLOv3Neck", "DetectionBlock"]


class DetectionBlock(nn.Module):
    """Five alternating 1x1 / 3x3 convs; Float[B,Cin,H,W] -> Float[B,out,H,W]."""

    def __init__(self, in_channels: int, out_channels: int, *, spp: bool = False,
                 norm: str | None = "BN", act: str | None = "leaky_relu"):
        super().__init__()
        o = out_channels

        def conv(i: int, c: int, k: int) -> ConvNormAct:
            return ConvNormAct(i, c, k, norm=norm, act=act)

        layers: list[nn.Module] = [conv(in_channels, o, 1), conv(o, 2 * o, 3), conv(2 * o, o, 1)]
        if spp:
            layers += [SpatialPyramidPooling((5, 9, 13)), conv(4 * o, o, 1)]
        layers += [conv(o, 2 * o, 3), conv(2 * o, o, 1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


@NECKS.register()
class YOLOv3Neck(nn.Module):
    """YOLOv3 top-down neck (see module doc).

    Args:
        input_shapes: backbone ``output_shape()``.
        in_features: inputs, default the three coarsest; ordered by stride.
        out_channels: per level (high -> low resolution), default half of each input's channels.
        spp: add SPP (max-pools 5/9/13) to the deepest block (YOLOv3-SPP).
        norm / act: ConvNormAct names (default BN + LeakyReLU 0.1).
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None = None,
                 out_channels: Sequence[int] | None = None, spp: bool = False,
                 norm: str | None = "BN", act: str | None = "leaky_relu"):
        super().__init__()
        names = sorted(input_shapes, key=lambda n: input_shapes[n].stride)
        names = list(in_features) if in_features is not None else names[-3:]
        if not names or any(n not in input_shapes for n in names):
            raise ValueError(f"YOLOv3Neck: in_features {names} not all in {list(input_shapes)}")
        self.in_features = sorted(names, key=lambda n: input_shapes[n].stride)
        in_ch = [input_shapes[n].channels for n in self.in_features]
        out_ch = list(out_channels) if out_channels is not None else [c // 2 for c in in_ch]
        if len(out_ch) != len(in_ch):
            raise ValueError(f"YOLOv3Neck: {len(in_ch)} levels but out_channels={out_ch}")
        n = len(in_ch)
        # blocks[i] / transitions[i] belong to level i (0 = highest resolution).
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i in range(n):
            extra = out_ch[i] if i < n - 1 else 0
            self.blocks.append(DetectionBlock(in_ch[i] + extra, out_ch[i], spp=spp and i == n - 1,
                                              norm=norm, act=act))
        for i in range(n - 1):
            self.transitions.append(ConvNormAct(out_ch[i + 1], out_ch[i], 1, norm=norm, act=act))
        self._shapes = {level_name(name): ShapeSpec(out_ch[i], input_shapes[name].stride)
                        for i, name in enumerate(self.in_features)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """{cK: Float[B,C_K,H_K,W_K]} -> {pK: Float[B,out_K,H_K,W_K]}."""
        xs = [features[n] for n in self.in_features]
        x = self.blocks[-1](xs[-1])
        outs = [x]
        for i in range(len(xs) - 2, -1, -1):
            up = F.interpolate(self.transitions[i](x), size=xs[i].shape[-2:], mode="nearest")
            x = self.blocks[i](torch.cat([xs[i], up], dim=1))
            outs.insert(0, x)
        return dict(zip(self._shapes, outs))
