"""ASPP: DeepLabV3 atrous spatial pyramid pooling.

Five parallel branches on Float[B,Cin,H,W]: a 1x1 conv, three 3x3 convs with dilation ``rates``
(6, 12, 18 at output stride 16; double them at output stride 8) and image pooling (global average
-> 1x1 conv -> upsampled back to HxW); concatenated (5 * Cout) and projected by a 1x1 conv to
Float[B,Cout,H,W]. Every conv is followed by norm + ReLU. Same computation as
``torchvision.models.segmentation.deeplabv3.ASPP`` (tested against it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv import ConvNormAct

__all__ = ["ASPP"]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling; Float[B,Cin,H,W] -> Float[B,Cout,H,W].

    Note: the pooling branch normalises a 1x1 map, so BN in training needs batch size > 1
    (use ``norm='GN'`` or ``'FrozenBN'`` for batch 1).
    """

    def __init__(self, in_channels: int, out_channels: int = 256, *,
                 rates: Sequence[int] = (6, 12, 18), norm: str | None = "BN", dropout: float = 0.1):
        super().__init__()
        branches = [ConvNormAct(in_channels, out_channels, 1, norm=norm, act="relu")]
        branches += [ConvNormAct(in_channels, out_channels, 3, dilation=int(r), norm=norm, act="relu")
                     for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool_conv = ConvNormAct(in_channels, out_channels, 1, norm=norm, act="relu")
        self.project = ConvNormAct(out_channels * (len(branches) + 1), out_channels, 1,
                                   norm=norm, act="relu")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_conv(F.adaptive_avg_pool2d(x, 1))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.dropout(self.project(torch.cat(outs, dim=1)))
