"""Spatial pyramid pooling: SPP (YOLOv3-SPP, parallel max-pools 5/9/13) and SPPF (YOLOv5's
sequential 5x5 pools, the same result for less work).

Pooling (``SpatialPyramidPooling``): Float[B,C,H,W] -> Float[B,(1+P)*C,H,W], the concatenation of
the input and P stride-1 max-pools ("same" padding). Stacking a k x k pool n times equals one
pool of size n*(k-1)+1 (max over a larger window), so SPPF(5, 3 pools) == SPP(5, 9, 13) exactly.

Necks ``SPP`` / ``SPPF``: on one level (default the deepest), 1x1 conv to ``hidden`` channels ->
pooling -> concat -> 1x1 conv to ``out_channels``; other levels pass through unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import NECKS
from ...structures import ShapeSpec
from ..layers.conv import ConvNormAct

__all__ = ["SpatialPyramidPooling", "SPP", "SPPF"]


class SpatialPyramidPooling(nn.Module):
    """concat([x, maxpool_k1(x), maxpool_k2(x), ...]) along channels; spatial size kept.

    ``sequential=True`` (SPPF) computes pool k_{i+1} as a k_1 pool of pool k_i, which requires
    ``kernel_sizes`` of the form k, 2k-1, 3k-2, ...
    """

    def __init__(self, kernel_sizes: Sequence[int] = (5, 9, 13), sequential: bool = False):
        super().__init__()
        self.kernel_sizes = [int(k) for k in kernel_sizes]
        if any(k % 2 == 0 or k < 1 for k in self.kernel_sizes):
            raise ValueError(f"SPP: kernel sizes must be odd and positive, got {self.kernel_sizes}")
        k = self.kernel_sizes[0]
        if sequential and self.kernel_sizes != [(i + 1) * (k - 1) + 1 for i in range(len(self.kernel_sizes))]:
            raise ValueError(f"SPPF: kernel sizes {self.kernel_sizes} are not repeated {k}x{k} pools "
                             f"(expected {[(i + 1) * (k - 1) + 1 for i in range(len(self.kernel_sizes))]})")
        self.sequential = sequential

    def forward(self, x: Tensor) -> Tensor:
        outs = [x]
        for k in self.kernel_sizes:
            if self.sequential:
                k, src = self.kernel_sizes[0], outs[-1]
            else:
                src = x
            outs.append(F.max_pool2d(src, kernel_size=k, stride=1, padding=k // 2))
        return torch.cat(outs, dim=1)


class _PoolingNeck(nn.Module):
    """Shared body of SPP / SPPF necks (see module doc)."""

    def __init__(self, input_shapes: dict[str, ShapeSpec], in_feature: str | None,
                 out_channels: int | None, hidden_channels: int | None, kernel_sizes: Sequence[int],
                 sequential: bool, norm: str | None, act: str | None):
        super().__init__()
        if not input_shapes:
            raise ValueError(f"{type(self).__name__}: empty input_shapes")
        if in_feature is None:
            in_feature = max(input_shapes, key=lambda n: input_shapes[n].stride)
        if in_feature not in input_shapes:
            raise ValueError(f"{type(self).__name__}: in_feature '{in_feature}' not in {list(input_shapes)}")
        self.in_feature = in_feature
        channels = input_shapes[in_feature].channels
        hidden = hidden_channels or channels // 2
        out_channels = out_channels or channels
        self.reduce = ConvNormAct(channels, hidden, 1, norm=norm, act=act)
        self.pool = SpatialPyramidPooling(kernel_sizes, sequential=sequential)
        self.fuse = ConvNormAct(hidden * (1 + len(kernel_sizes)), out_channels, 1, norm=norm, act=act)
        self._shapes = dict(input_shapes)
        self._shapes[in_feature] = ShapeSpec(out_channels, input_shapes[in_feature].stride)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Same keys and spatial sizes as ``features``; ``in_feature`` gets ``out_channels``."""
        out = dict(features)
        out[self.in_feature] = self.fuse(self.pool(self.reduce(features[self.in_feature])))
        return out


@NECKS.register()
class SPP(_PoolingNeck):
    """SPP block on one level: 1x1 conv -> [x, pool 5, 9, 13] -> 1x1 conv."""

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_feature: str | None = None,
                 out_channels: int | None = None, hidden_channels: int | None = None,
                 kernel_sizes: Sequence[int] = (5, 9, 13), norm: str | None = "BN",
                 act: str | None = "leaky_relu"):
        super().__init__(input_shapes, in_feature, out_channels, hidden_channels, kernel_sizes,
                         False, norm, act)


@NECKS.register()
class SPPF(_PoolingNeck):
    """SPPF block on one level: 1x1 conv -> [x, pool k, pool k twice, ...] -> 1x1 conv."""

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_feature: str | None = None,
                 out_channels: int | None = None, hidden_channels: int | None = None,
                 kernel_size: int = 5, num_pools: int = 3, norm: str | None = "BN",
                 act: str | None = "leaky_relu"):
        sizes = [(i + 1) * (kernel_size - 1) + 1 for i in range(num_pools)]
        super().__init__(input_shapes, in_feature, out_channels, hidden_channels, sizes, True,
                         norm, act)
