"""PAN: path aggregation network (PANet / PAFPN): an FPN followed by a bottom-up path.

Inputs cK -> FPN outputs fK (top-down) -> bottom-up outputs pK, all Float[B,out,H_K,W_K]:

    p_low = f_low                                         (highest resolution level)
    p_K   = conv3x3(f_K + conv3x3_stride2(p_{K-1}))        for the coarser levels

Optional extra levels: ``maxpool`` adds max_pool2d(kernel 1, stride 2) of the last output
``num_extra`` times (as FPN). YOLOv4/v5 use the same topology with concatenation and CSP blocks;
this is the additive PAFPN form.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import NECKS
from ...structures import ShapeSpec
from .fpn import FPN, _conv, _init

__all__ = ["PAN"]


@NECKS.register()
class PAN(nn.Module):
    """FPN + bottom-up path aggregation.

    Args:
        input_shapes: backbone ``output_shape()``.
        in_features: inputs, default all.
        out_channels: channels of every output.
        extra_levels: None or ``maxpool``; num_extra: how many (default 1).
        norm: None (plain convs with bias) or a norm name.

    Output names pK follow the inputs' level numbers (c3..c5 -> p3..p5 [+ p6...]).
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None = None,
                 out_channels: int = 256, extra_levels: str | None = None, num_extra: int = 1,
                 norm: str | None = None):
        super().__init__()
        if extra_levels not in (None, "maxpool"):
            raise ValueError(f"PAN: extra_levels must be None or 'maxpool', got '{extra_levels}'")
        self.fpn = FPN(input_shapes=input_shapes, in_features=in_features,
                       out_channels=out_channels, norm=norm)
        levels = len(self.fpn.in_features)
        self.downsample_convs = nn.ModuleList(
            _conv(out_channels, out_channels, 3, 2, norm) for _ in range(levels - 1))
        self.pan_convs = nn.ModuleList(
            _conv(out_channels, out_channels, 3, 1, norm) for _ in range(levels - 1))
        _init(self.downsample_convs)
        _init(self.pan_convs)
        self.num_extra = int(num_extra) if extra_levels else 0
        self._shapes = self.fpn.output_shape()
        last = list(self._shapes)[-1]
        level, stride = int(last[1:]), self._shapes[last].stride
        for i in range(1, self.num_extra + 1):
            self._shapes[f"p{level + i}"] = ShapeSpec(out_channels, stride * 2 ** i)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """{cK: Float[B,C_K,H_K,W_K]} -> {pK: Float[B,out,H_K,W_K]} (+ extra levels)."""
        inter = list(self.fpn(features).values())
        outs = [inter[0]]
        for i, (down, conv) in enumerate(zip(self.downsample_convs, self.pan_convs)):
            target = inter[i + 1]
            x = down(outs[-1])
            if x.shape[-2:] != target.shape[-2:]:  # backbones whose levels are not ceil(H/2)
                x = F.interpolate(x, size=target.shape[-2:], mode="nearest")
            outs.append(conv(target + x))
        for _ in range(self.num_extra):
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return dict(zip(self._shapes, outs))
