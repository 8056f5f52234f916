"""ConvNormAct: Conv2d -> optional norm -> optional activation, the unit most layers are made of.

Norms by name: ``BN``, ``SyncBN``, ``FrozenBN``, ``GN`` (32 groups), ``None``/``"none"``.
Activations by name: ``relu``, ``leaky_relu`` (slope 0.1, as Darknet), ``silu``, ``None``/``"none"``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .frozen_bn import FrozenBatchNorm2d

__all__ = ["ConvNormAct", "build_norm", "build_activation", "NORMS", "ACTIVATIONS"]

NORMS = ("BN", "SyncBN", "FrozenBN", "GN")
ACTIVATIONS = ("relu", "leaky_relu", "silu")


def _is_none(name) -> bool:
    return name is None or (isinstance(name, str) and name.lower() == "none")


def build_norm(name: str | None, channels: int) -> nn.Module | None:
    """A 2d normalisation layer for ``channels`` channels, or None for ``name`` None/'none'."""
    if _is_none(name):
        return None
    if name == "BN":
        return nn.BatchNorm2d(channels)
    if name == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if name == "GN":
        groups = 32 if channels % 32 == 0 else 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm '{name}'; valid: {', '.join(NORMS)} or none")


def build_activation(name: str | None) -> nn.Module | None:
    """An activation module, or None for ``name`` None/'none'."""
    if _is_none(name):
        return None
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    if name == "silu":
        return nn.SiLU(inplace=True)
    raise ValueError(f"unknown activation '{name}'; valid: {', '.join(ACTIVATIONS)} or none")


class ConvNormAct(nn.Sequential):
    """Conv2d (``padding`` defaults to 'same' for odd kernels) -> norm -> activation.

    Submodules are ``conv``, and ``norm`` / ``act`` when used. The conv has a bias only when there
    is no norm (a bias before a norm is redundant). Input Float[B,Cin,H,W] ->
    Float[B,Cout,ceil(H/stride),ceil(W/stride)].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 *, padding: int | None = None, dilation: int = 1, groups: int = 1,
                 norm: str | None = "BN", act: str | None = "relu", bias: bool | None = None):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        norm_layer = build_norm(norm, out_channels)
        if bias is None:
            bias = norm_layer is None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation=dilation, groups=groups, bias=bias)
        if norm_layer is not None:
            self.norm = norm_layer
        act_layer = build_activation(act)
        if act_layer is not None:
            self.act = act_layer

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102  (same as Sequential, typed)
        return super().forward(x)
