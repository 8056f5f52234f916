"""RF-DETR / LW-DETR multi-scale projector: fuse the selected ViT layers into 1..3 levels.

Legend: B images, C_i channels of input i (all stride s), D ``out_channels``, f a scale factor.

For every scale factor f (2.0, 1.0 or 0.5) one level is built: each input is resampled to
stride s / f (f=2: a 2x2 stride-2 transposed conv halving the channels, after a 1x1 conv-norm-ReLU
halving them first when C_i > 512; f=0.5: a 3x3 stride-2 conv-norm-ReLU; f=1: nothing), the
resampled maps are concatenated, fused by a C2f block (1x1 conv to 2h channels, split, n pairs
of 3x3 conv-norm-act on the last half, concatenation of all, 1x1 conv to D; h = D *
``hidden_expansion``) and normalised by a channels-first LayerNorm.

Level names follow RF-DETR's ``projector_scale``: f=2 -> ``p3``, 1 -> ``p4``, 0.5 -> ``p5``, in
the order of ``scale_factors``; strides s/f (rounded: 7 for f=2 on patch-14 ViTs).

Norms: ``LN`` (RF-DETR: a LayerNorm over channels in every conv-norm) or ``BN`` (LW-DETR). With
the same weights this computes transformers' ``RfDetrScaleProjector`` (LN, f=1) and
``LwDetrMultiScaleProjector`` (BN, any factors).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

from ...registry import NECKS
from ...structures import ShapeSpec

__all__ = ["RFDETRProjector", "ChannelLayerNorm", "C2fFusion"]

_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
_SCALES = (2.0, 1.0, 0.5)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of Float[B,C,H,W] (ConvNeXt's channels-first LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_norm(in_ch: int, out_ch: int, kernel: int, stride: int, *, norm: str, eps: float,
               act: str | None) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) -> BN / channels-first LN -> activation."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False)),
        ("norm", nn.BatchNorm2d(out_ch, eps=eps) if norm == "BN" else ChannelLayerNorm(out_ch, eps=eps)),
        ("act", nn.Identity() if act is None else _ACTIVATIONS[act]()),
    ]))


class C2fFusion(nn.Module):
    """C2f block: Float[B,Cin,H,W] -> Float[B,out,H,W] (see the module doc)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_blocks: int, hidden_expansion: float,
                 norm: str, eps: float, act: str):
        super().__init__()
        self.hidden = int(out_channels * hidden_expansion)
        kw = dict(norm=norm, eps=eps, act=act)
        self.conv1 = _conv_norm(in_channels, 2 * self.hidden, 1, 1, **kw)   # type: ignore[arg-type]
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_norm(self.hidden, self.hidden, 3, 1, **kw),   # type: ignore[arg-type]
                          _conv_norm(self.hidden, self.hidden, 3, 1, **kw))   # type: ignore[arg-type]
            for _ in range(num_blocks))
        self.conv2 = _conv_norm((2 + num_blocks) * self.hidden, out_channels, 1, 1, **kw)   # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.conv1(x).split(self.hidden, dim=1))
        y = parts[-1]
        for block in self.blocks:
            y = block(y)
            parts.append(y)
        return self.conv2(torch.cat(parts, dim=1))


def _sampler(channels: int, scale: float, *, norm: str, eps: float) -> tuple[nn.Sequential, int]:
    """(resampling layers for one input, their output channels)."""
    if scale == 2.0:
        if channels > 512:   # large ViTs: halve the channels before the transposed conv
            return nn.Sequential(_conv_norm(channels, channels // 2, 1, 1, norm=norm, eps=eps, act="relu"),
                                 nn.ConvTranspose2d(channels // 2, channels // 4, 2, 2)), channels // 4
        return nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, 2)), channels // 2
    if scale == 0.5:
        return nn.Sequential(_conv_norm(channels, channels, 3, 2, norm=norm, eps=eps, act="relu")), channels
    return nn.Sequential(), channels


class ProjectorLevel(nn.Module):
    """One output level: resample each input, concatenate, C2f, LayerNorm -> Float[B,D,h,w]."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, scale: float, *, num_blocks: int,
                 hidden_expansion: float, norm: str, eps: float, out_norm_eps: float, act: str):
        super().__init__()
        samplers = [_sampler(c, scale, norm=norm, eps=eps) for c in in_channels]
        self.samplers = nn.ModuleList(s for s, _ in samplers)
        self.fuse = C2fFusion(sum(c for _, c in samplers), out_channels, num_blocks=num_blocks,
                              hidden_expansion=hidden_expansion, norm=norm, eps=eps, act=act)
        self.norm = ChannelLayerNorm(out_channels, eps=out_norm_eps)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.norm(self.fuse(torch.cat([s(f) for s, f in zip(self.samplers, features)], dim=1)))


@NECKS.register()
class RFDETRProjector(nn.Module):
    """RF-DETR / LW-DETR projector (see the module doc).

    Args:
        input_shapes: backbone ``output_shape()`` (all inputs at one stride, as a ViT gives).
        in_features: inputs to fuse, in this order (default: all, in the backbone's order).
        out_channels: D of every level (the decoder's d_model).
        scale_factors: one level per factor, each 2.0, 1.0 or 0.5 (RF-DETR [1.0], LW-DETR any).
        num_blocks: conv pairs of the C2f block; hidden_expansion: its width ratio.
        norm: ``LN`` (RF-DETR) or ``BN`` (LW-DETR) in every conv-norm; norm_eps: its epsilon.
        out_norm_eps: epsilon of each level's final LayerNorm.
        act: activation of the C2f convs (``silu``, ``relu``, ``gelu``); the samplers use ReLU.
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None = None,
                 out_channels: int = 256, scale_factors: Sequence[float] = (1.0,), num_blocks: int = 3,
                 hidden_expansion: float = 0.5, norm: str = "LN", norm_eps: float = 1e-5,
                 out_norm_eps: float = 1e-6, act: str = "silu"):
        super().__init__()
        names = list(in_features) if in_features is not None else list(input_shapes)
        missing = [n for n in names if n not in input_shapes]
        if missing or not names:
            raise ValueError(f"RFDETRProjector: in_features {names} not all in the backbone outputs "
                             f"{list(input_shapes)}")
        strides = {input_shapes[n].stride for n in names}
        if len(strides) != 1:
            raise ValueError(f"RFDETRProjector: inputs must share one stride, got {sorted(strides)}")
        factors = [float(f) for f in scale_factors]
        if not factors or any(f not in _SCALES for f in factors) or len(set(factors)) != len(factors):
            raise ValueError(f"RFDETRProjector: scale_factors must be distinct values of {list(_SCALES)}, "
                             f"got {list(scale_factors)}")
        if norm not in ("LN", "BN"):
            raise ValueError(f"RFDETRProjector: norm must be 'LN' or 'BN', got '{norm}'")
        if act not in _ACTIVATIONS:
            raise ValueError(f"RFDETRProjector: act must be one of {', '.join(_ACTIVATIONS)}, got '{act}'")
        self.in_features, self.scale_factors = names, factors
        channels = [input_shapes[n].channels for n in names]
        self.levels = nn.ModuleList(
            ProjectorLevel(channels, out_channels, f, num_blocks=num_blocks,
                           hidden_expansion=hidden_expansion, norm=norm, eps=norm_eps,
                           out_norm_eps=out_norm_eps, act=act) for f in factors)
        stride = strides.pop()
        self._shapes = {f"p{4 - round(math.log2(f))}": ShapeSpec(out_channels, max(1, round(stride / f)))
                        for f in factors}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """{name: Float[B,C_i,h,w]} -> {pK: Float[B,D,h*f,w*f]} (f=0.5: ceil(h/2) x ceil(w/2))."""
        xs = [features[n] for n in self.in_features]
        return {name: level(xs) for name, level in zip(self._shapes, self.levels)}
