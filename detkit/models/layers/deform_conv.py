"""DeformConvBlock: deformable convolution v1 / v2 (modulated) on ``torchvision.ops.deform_conv2d``.

The block owns the kernel (``weight`` Float[Cout, Cin/groups, k, k], optional ``bias``) under the
same names as ``nn.Conv2d``, so a pretrained conv's weights load into it unchanged, plus
``offset_conv``: a plain conv predicting per-position sampling offsets (2 * k*k per deformable
group) and, for v2, a modulation mask (k*k per group). ``offset_conv`` starts at zero, so at
initialisation the offsets are 0 and the mask is 1, and the block computes exactly the plain conv.

Mask convention (v2): ``mask = 2 * sigmoid(m)``, range (0, 2), equal to 1 at m = 0. (The DCNv2
paper uses ``sigmoid(m)``, i.e. 0.5 at init, which halves a pretrained conv's response.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

__all__ = ["DeformConvBlock"]


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


class DeformConvBlock(nn.Module):
    """Deformable conv; Float[B,Cin,H,W] -> Float[B,Cout,Ho,Wo] with Conv2d's output size rule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...] = 3,
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] | None = None,
                 dilation: int | tuple[int, ...] = 1, groups: int = 1, *,
                 bias: bool = True, version: int = 1, deform_groups: int = 1):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"DeformConvBlock: version must be 1 or 2, got {version}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConvBlock: channels ({in_channels}, {out_channels}) not "
                             f"divisible by groups={groups}")
        k = _pair(kernel_size)
        dil = _pair(dilation)
        pad = (dil[0] * (k[0] - 1) // 2, dil[1] * (k[1] - 1) // 2) if padding is None else padding
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = k, _pair(stride)
        self.padding, self.dilation = _pair(pad), dil
        self.groups, self.version, self.deform_groups = groups, version, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        per_group = k[0] * k[1] * deform_groups
        offset_channels = per_group * (3 if version == 2 else 2)
        self.offset_conv = nn.Conv2d(in_channels, offset_channels, k, self.stride, self.padding,
                                     dilation=self.dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.offset_conv.weight)
        assert self.offset_conv.bias is not None  # built with bias=True
        nn.init.zeros_(self.offset_conv.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, version: int = 1, deform_groups: int = 1) -> "DeformConvBlock":
        """A deformable conv with ``conv``'s geometry and a copy of its weights (and bias)."""
        if isinstance(conv.padding, str):
            raise ValueError(f"DeformConvBlock.from_conv: string padding {conv.padding!r} is not supported")
        block = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                    version=version, deform_groups=deform_groups)
        with torch.no_grad():
            block.weight.copy_(conv.weight)
            if conv.bias is not None:
                assert block.bias is not None  # built with bias=True above
                block.bias.copy_(conv.bias)
        return block.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        out = self.offset_conv(x)
        mask = None
        if self.version == 2:
            n_offset = 2 * self.kernel_size[0] * self.kernel_size[1] * self.deform_groups
            out, mask_logits = out[:, :n_offset], out[:, n_offset:]
            mask = 2.0 * torch.sigmoid(mask_logits)
        return deform_conv2d(x, out, self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, version={self.version}, deform_groups={self.deform_groups}")
