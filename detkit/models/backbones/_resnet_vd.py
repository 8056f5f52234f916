"""The parts of ResNet-vd (RT-DETR's "PResNet" variant) that differ from torchvision's ResNet.

- Stem: three conv3x3+BN+ReLU (stride 2, 1, 1; widths stem/2, stem/2, stem) instead of one 7x7,
  then the usual maxpool3x3/2: Float[B,3,H,W] -> Float[B,stem,ceil(H/4),ceil(W/4)].
- Shortcut of a block that downsamples: avgpool2x2/2 (ceil_mode) then conv1x1 stride 1 + BN, so
  the projection sees every input pixel instead of one in four.
- The first block of every stage of the basic-block depths (18/34) always has a projection
  shortcut, even when the channels do not change (stage 1), as RT-DETR's reference code.

Blocks are torchvision's ``BasicBlock`` / ``Bottleneck`` (stride on the 3x3 conv); the shortcut is
``downsample = Sequential(AvgPool2d or Identity, Conv2d, norm)``, keys ``downsample.1``/``.2``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..layers.conv import ConvNormAct

__all__ = ["vd_stem", "vd_stage", "VD_STAGE_BLOCKS"]

# torchvision's blocks per stage for each depth (ResNet-vd keeps them)
VD_STAGE_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
                   152: [3, 8, 36, 3]}


def vd_stem(width: int, norm: str) -> nn.Sequential:
    """The deep stem without its maxpool: Float[B,3,H,W] -> Float[B,width,ceil(H/2),ceil(W/2)]."""
    return nn.Sequential(ConvNormAct(3, width // 2, 3, 2, norm=norm),
                         ConvNormAct(width // 2, width // 2, 3, 1, norm=norm),
                         ConvNormAct(width // 2, width, 3, 1, norm=norm))


def _shortcut(cin: int, cout: int, stride: int, norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    pool: nn.Module = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), norm_layer(cout))


def vd_stage(*, bottleneck: bool, in_channels: int, out_channels: int, num_blocks: int, stride: int,
             norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    """One stage: Float[B,in,H,W] -> Float[B,out,ceil(H/stride),ceil(W/stride)].

    ``out_channels`` of a bottleneck stage is its expanded width (4 x the 3x3 conv's width)."""
    if bottleneck and out_channels % Bottleneck.expansion:
        raise ValueError(f"ResNet: a bottleneck stage's channels must be divisible by 4, got {out_channels}")
    blocks = []
    for i in range(num_blocks):
        cin, s = (in_channels, stride) if i == 0 else (out_channels, 1)
        project = s != 1 or cin != out_channels or (i == 0 and not bottleneck)
        downsample = _shortcut(cin, out_channels, s, norm_layer) if project else None
        if bottleneck:
            blocks.append(Bottleneck(cin, out_channels // Bottleneck.expansion, s, downsample,
                                     norm_layer=norm_layer))
        else:
            blocks.append(BasicBlock(cin, out_channels, s, downsample, norm_layer=norm_layer))
    return nn.Sequential(*blocks)
