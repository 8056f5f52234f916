"""Convolutional fusion blocks of the real-time DETR hybrid encoders (RT-DETR's CCFM, D-FINE's).

All blocks map Float[B,Cin,H,W] -> Float[B,Cout,H',W'] (H' = H unless a stride says otherwise);
every conv is followed by BatchNorm (``ConvNormAct``), ``act`` names the activation.

- ``RepVGGBlock``: act(BN(conv3x3(x)) + BN(conv1x1(x))), the training-time form of RepVGG (the two
  branches can be folded into one 3x3 conv for deployment; detkit keeps them apart).
- ``CSPRepBlock``: RT-DETR's RepC3 / CSPRepLayer: two 1x1 branches, RepVGG blocks on one of them,
  summed, then an optional 1x1 to the output width.
- ``RepNCSPELAN4``: D-FINE's ELAN-style block: a 1x1 split in two halves, two CSPRep + 3x3 stages
  chained on one half, everything concatenated and fused by a 1x1.
- ``SCDown``: D-FINE's downsampling: 1x1 conv then a depthwise 3x3 stride-2 conv (no activations).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.conv import ConvNormAct, build_activation

__all__ = ["RepVGGBlock", "CSPRepBlock", "RepNCSPELAN4", "SCDown"]


class RepVGGBlock(nn.Module):
    """Parallel 3x3 and 1x1 conv+BN branches, summed, then the activation; channels kept."""

    def __init__(self, channels: int, *, act: str | None = "silu", norm: str = "BN"):
        super().__init__()
        self.conv3x3 = ConvNormAct(channels, channels, 3, norm=norm, act=None)
        self.conv1x1 = ConvNormAct(channels, channels, 1, norm=norm, act=None)
        self.act = build_activation(act) or nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3x3(x) + self.conv1x1(x))


class CSPRepBlock(nn.Module):
    """Cross-stage-partial block of ``num_blocks`` RepVGG blocks (RT-DETR's RepC3).

    ``hidden = int(out_channels * expansion)``; the output 1x1 exists only when hidden != out.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_blocks: int = 3,
                 expansion: float = 1.0, act: str | None = "silu", norm: str = "BN"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormAct(in_channels, hidden, 1, norm=norm, act=act)
        self.conv2 = ConvNormAct(in_channels, hidden, 1, norm=norm, act=act)
        self.blocks = nn.Sequential(*(RepVGGBlock(hidden, act=act, norm=norm) for _ in range(num_blocks)))
        self.conv3 = (ConvNormAct(hidden, out_channels, 1, norm=norm, act=act)
                      if hidden != out_channels else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.blocks(self.conv1(x)) + self.conv2(x))


class RepNCSPELAN4(nn.Module):
    """D-FINE's fusion block: ``in_channels`` -> ``out_channels``.

    Widths: the split conv gives 2 * ``split_channels`` (two halves); the branch width is
    ``branch_channels``; the fusing 1x1 sees 2 * split + 2 * branch channels.
    """

    def __init__(self, in_channels: int, out_channels: int, *, split_channels: int,
                 branch_channels: int, num_blocks: int = 3, act: str | None = "silu", norm: str = "BN"):
        super().__init__()
        self.split_channels = split_channels
        self.split_conv = ConvNormAct(in_channels, 2 * split_channels, 1, norm=norm, act=act)
        self.csp1 = CSPRepBlock(split_channels, branch_channels, num_blocks=num_blocks, act=act, norm=norm)
        self.conv1 = ConvNormAct(branch_channels, branch_channels, 3, norm=norm, act=act)
        self.csp2 = CSPRepBlock(branch_channels, branch_channels, num_blocks=num_blocks, act=act, norm=norm)
        self.conv2 = ConvNormAct(branch_channels, branch_channels, 3, norm=norm, act=act)
        self.merge_conv = ConvNormAct(2 * split_channels + 2 * branch_channels, out_channels, 1,
                                      norm=norm, act=act)

    def forward(self, x: Tensor) -> Tensor:
        first, second = self.split_conv(x).split(self.split_channels, dim=1)
        branch1 = self.conv1(self.csp1(second))
        branch2 = self.conv2(self.csp2(branch1))
        return self.merge_conv(torch.cat([first, second, branch1, branch2], dim=1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling: 1x1 conv+BN, then depthwise kxk stride-s conv+BN.

    Float[B,C,H,W] -> Float[B,C,ceil(H/s),ceil(W/s)] (padding (k-1)//2, so ceil for k=3, s=2).
    """

    def __init__(self, channels: int, *, kernel_size: int = 3, stride: int = 2, norm: str = "BN"):
        super().__init__()
        self.pointwise = ConvNormAct(channels, channels, 1, norm=norm, act=None)
        self.depthwise = ConvNormAct(channels, channels, kernel_size, stride, groups=channels,
                                     norm=norm, act=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.depthwise(self.pointwise(x))
