"""FPN: feature pyramid network (lateral 1x1 + nearest top-down + 3x3 output convs).

Input features ``cK`` (Float[B,C_K,H_K,W_K], stride s_K) -> outputs ``pK`` Float[B,out,H_K,W_K],
plus optional extra coarser levels p(K_last+1), ... each at twice the previous stride:

* ``maxpool``: max_pool2d(kernel 1, stride 2) of the last output (torchvision's LastLevelMaxPool,
  the P6 of Faster R-CNN);
* ``conv_c5`` / ``conv_p5``: a 3x3 stride-2 conv on the deepest *input* / *output*, then
  ReLU -> 3x3 stride-2 conv for each further level (RetinaNet / FCOS P6-P7).

The top-down path upsamples (nearest) to each lateral's exact size, so inputs whose sizes are
not divisible by 32 work. With ``norm=None`` this computes exactly what
``torchvision.ops.FeaturePyramidNetwork`` computes given the same weights.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import NECKS
from ...structures import ShapeSpec
from ..layers.conv import ConvNormAct

__all__ = ["FPN", "level_name"]

EXTRA_LEVELS = (None, "maxpool", "conv_c5", "conv_p5")


def level_name(feature: str, prefix: str = "p") -> str:
    """``c4`` -> ``p4``: keeps the trailing level number of a feature name."""
    digits = "".join(ch for ch in feature if ch.isdigit())
    if not digits:
        raise ValueError(f"feature name '{feature}' has no level number (expected like 'c4')")
    return f"{prefix}{int(digits)}"


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, norm: str | None) -> nn.Module:
    if norm is None or norm == "none":
        return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2)
    return ConvNormAct(in_ch, out_ch, kernel, stride, norm=norm, act=None)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)  # as torchvision's and detectron2's FPN
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@NECKS.register()
class FPN(nn.Module):
    """Feature pyramid network.

    Args:
        input_shapes: backbone ``output_shape()``.
        in_features: inputs to use, default all; processed from high to low resolution.
        out_channels: channels of every output.
        extra_levels: None, ``maxpool``, ``conv_c5`` or ``conv_p5`` (see module doc).
        num_extra: number of extra levels (default 1 for ``maxpool``, 2 for the conv variants).
        norm: None (plain convs with bias) or a norm name for ConvNormAct (``GN``, ``BN``...).

    ``lateral_convs`` / ``output_convs`` are ModuleLists ordered high -> low resolution.
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None = None,
                 out_channels: int = 256, extra_levels: str | None = None, num_extra: int | None = None,
                 norm: str | None = None):
        super().__init__()
        if extra_levels not in EXTRA_LEVELS:
            raise ValueError(f"FPN: extra_levels must be one of {EXTRA_LEVELS}, got '{extra_levels}'")
        names = list(in_features) if in_features is not None else list(input_shapes)
        missing = [n for n in names if n not in input_shapes]
        if missing or not names:
            raise ValueError(f"FPN: in_features {names} not all in the backbone outputs "
                             f"{list(input_shapes)}")
        self.in_features = sorted(names, key=lambda n: input_shapes[n].stride)
        self.extra_levels = extra_levels
        if num_extra is None:
            num_extra = {None: 0, "maxpool": 1}.get(extra_levels, 2)
        if extra_levels is None:
            num_extra = 0
        self.num_extra = int(num_extra)

        self.lateral_convs = nn.ModuleList(
            _conv(input_shapes[n].channels, out_channels, 1, 1, norm) for n in self.in_features)
        self.output_convs = nn.ModuleList(
            _conv(out_channels, out_channels, 3, 1, norm) for _ in self.in_features)
        self.extra_convs = nn.ModuleList()
        if extra_levels in ("conv_c5", "conv_p5"):
            first_in = (input_shapes[self.in_features[-1]].channels if extra_levels == "conv_c5"
                        else out_channels)
            for i in range(self.num_extra):
                self.extra_convs.append(_conv(first_in if i == 0 else out_channels, out_channels, 3, 2, norm))
        _init(self)

        last = self.in_features[-1]
        self._shapes = {level_name(n): ShapeSpec(out_channels, input_shapes[n].stride)
                        for n in self.in_features}
        level, stride = int(level_name(last)[1:]), input_shapes[last].stride
        for i in range(1, self.num_extra + 1):
            self._shapes[f"p{level + i}"] = ShapeSpec(out_channels, stride * 2 ** i)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """{cK: Float[B,C_K,H_K,W_K]} -> {pK: Float[B,out,H_K,W_K]} (+ extra levels)."""
        xs = [features[n] for n in self.in_features]
        top = self.lateral_convs[-1](xs[-1])
        outs = [self.output_convs[-1](top)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.lateral_convs[i](xs[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output_convs[i](top))
        outs.extend(self._extra(xs[-1], outs[-1]))
        return dict(zip(self._shapes, outs))

    def _extra(self, deepest_input: Tensor, deepest_output: Tensor) -> list[Tensor]:
        if self.extra_levels == "maxpool":
            extra, x = [], deepest_output
            for _ in range(self.num_extra):
                x = F.max_pool2d(x, kernel_size=1, stride=2, padding=0)
                extra.append(x)
            return extra
        extra = []
        x = deepest_input if self.extra_levels == "conv_c5" else deepest_output
        for i, conv in enumerate(self.extra_convs):
            x = conv(F.relu(x) if i > 0 else x)
            extra.append(x)
        return extra
