"""CenterNetUpsample: the deconvolution neck of CenterNet-ResNet ("Objects as Points", sec. 4).

Takes the deepest backbone map (``c5``, stride 32) up to stride 4 with three stages of
``3x3 conv (or deformable conv) -> BN -> ReLU -> 4x4 transposed conv, stride 2 -> BN -> ReLU``.
The transposed convs start as per-channel bilinear upsampling, so at initialisation the neck
upsamples smoothly instead of producing the checkerboard of a random deconvolution.

Optional shortcuts (not in the CenterNet paper; TTFNet, Liu et al. 2019): after stage i, a
3x3 conv -> BN -> ReLU of a higher-resolution backbone map (``shortcuts[i]``, e.g. c4, c3, c2) is
added, which gives the upsampled features back the spatial detail a from-scratch network lacks.

Shapes: Float[B, Cin, H, W] -> Float[B, channels[-1], H * 2^S, W * 2^S] for S = len(channels).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ...registry import NECKS
from ...structures import ShapeSpec
from ..layers.conv import ConvNormAct, build_norm
from ..layers.deform_conv import DeformConvBlock

__all__ = ["CenterNetUpsample", "bilinear_deconv_weight"]


def bilinear_deconv_weight(channels: int, kernel_size: int) -> Tensor:
    """Float[channels, channels, k, k] ConvTranspose2d weight that bilinearly upsamples each channel
    independently (identity across channels); with k=4, stride 2, padding 1 it matches
    ``F.interpolate(scale_factor=2, mode='bilinear', align_corners=False)`` away from the border."""
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - centre).abs() / factor
    kernel = taps[:, None] * taps[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[torch.arange(channels), torch.arange(channels)] = kernel
    return weight


class _UpStage(nn.Sequential):
    """conv 3x3 (plain or deformable) -> norm -> ReLU -> deconv x2 -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, deformable: bool, dcn_version: int,
                 norm: str):
        super().__init__()
        if deformable:
            self.conv = nn.Sequential()
            self.conv.add_module("conv", DeformConvBlock(in_channels, out_channels, 3, bias=False,
                                                         version=dcn_version))
            self.conv.add_module("norm", build_norm(norm, out_channels))
            self.conv.add_module("act", nn.ReLU(inplace=True))
        else:
            self.conv = ConvNormAct(in_channels, out_channels, 3, norm=norm, act="relu")
        self.up = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, padding=1, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(bilinear_deconv_weight(out_channels, 4))
        self.up_norm = build_norm(norm, out_channels)
        self.up_act = nn.ReLU(inplace=True)


@NECKS.register()
class CenterNetUpsample(nn.Module):
    """Upsampling neck of CenterNet-ResNet (with optional deformable convs, "ResNet-DCN").

    Args:
        input_shapes: backbone output shapes; must contain ``in_feature``.
        in_feature: backbone map to upsample (``c5``).
        channels: output channels of each x2 stage (CenterNet: 256, 128, 64).
        deformable: deformable 3x3 convs (CenterNet's ResNet-DCN) instead of plain ones.
        dcn_version: 1 (offsets) or 2 (modulated, as CenterNet's DCNv2).
        norm: norm after each conv (``BN``, ``SyncBN``, ``GN``, ...).
        out_name: key of the output map (``p2`` for stride 4).
        shortcuts: optional backbone maps added after each stage (at most one per stage, in
            order, each with the stride that stage produces), e.g. ``[c4, c3, c2]``.
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_feature: str = "c5",
                 channels: Sequence[int] = (256, 128, 64), deformable: bool = False,
                 dcn_version: int = 2, norm: str = "BN", out_name: str = "p2",
                 shortcuts: Sequence[str] = ()):
        super().__init__()
        if in_feature not in input_shapes:
            raise ValueError(f"CenterNetUpsample: in_feature '{in_feature}' is not an output of the "
                             f"backbone (available: {', '.join(input_shapes)}); add it to the "
                             f"backbone's out_features")
        if len(channels) == 0:
            raise ValueError("CenterNetUpsample: channels must list at least one stage")
        spec = input_shapes[in_feature]
        if spec.stride % (2 ** len(channels)):
            raise ValueError(f"CenterNetUpsample: {len(channels)} x2 stages do not divide the "
                             f"stride {spec.stride} of '{in_feature}'")
        self.in_feature, self.out_name = in_feature, out_name
        self.shortcuts = [str(name) for name in shortcuts]
        self._check_shortcuts(input_shapes, spec.stride, len(channels))
        stages, laterals, previous = [], [], spec.channels
        for i, ch in enumerate(channels):
            stages.append(_UpStage(previous, int(ch), deformable=deformable,
                                   dcn_version=dcn_version, norm=norm))
            if i < len(self.shortcuts):
                laterals.append(ConvNormAct(input_shapes[self.shortcuts[i]].channels, int(ch), 3,
                                            norm=norm, act="relu"))
            previous = int(ch)
        self.stages = nn.ModuleList(stages)
        self.laterals = nn.ModuleList(laterals)
        self._out_shape = ShapeSpec(channels=previous, stride=spec.stride // 2 ** len(channels))

    def _check_shortcuts(self, input_shapes: dict[str, ShapeSpec], stride: int, num_stages: int) -> None:
        if len(self.shortcuts) > num_stages:
            raise ValueError(f"CenterNetUpsample: {len(self.shortcuts)} shortcuts for {num_stages} stages")
        for i, name in enumerate(self.shortcuts):
            if name not in input_shapes:
                raise ValueError(f"CenterNetUpsample: shortcut '{name}' is not an output of the "
                                 f"backbone (available: {', '.join(input_shapes)}); add it to the "
                                 f"backbone's out_features")
            if input_shapes[name].stride != stride // 2 ** (i + 1):
                raise ValueError(f"CenterNetUpsample: shortcut {i} '{name}' has stride "
                                 f"{input_shapes[name].stride}, stage {i} outputs stride "
                                 f"{stride // 2 ** (i + 1)}")

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {self.out_name: self._out_shape}

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """``features[in_feature]`` Float[B,Cin,H,W] -> ``{out_name: Float[B,C,H*2^S,W*2^S]}``."""
        x = features[self.in_feature]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.laterals):
                x = x + self.laterals[i](features[self.shortcuts[i]])
        return {self.out_name: x}
