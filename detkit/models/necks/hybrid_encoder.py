"""The hybrid encoder of RT-DETR (v1/v2) and D-FINE: input projections, AIFI, CCFM.

Legend: B images, D ``hidden_dim``, L levels (strides s_1 < ... < s_L), H_l x W_l the size of
level l, S = H_l * W_l tokens of an attended level.

    inputs  {cK: Float[B,C_K,H_K,W_K]}
    proj    conv1x1 + BN per level                      -> Float[B,D,H_K,W_K]
    AIFI    transformer encoder layers on the chosen levels (the last by default): tokens
            Float[B,S,D] + 2-D sin-cos position embedding (computed for the actual H x W)
    CCFM    top-down: lateral conv on the coarser map, nearest 2x upsample, concat with the finer
            map, fusion block; bottom-up: stride-2 downsample, concat, fusion block
    outputs {pK: Float[B,D,H_K,W_K]} with the inputs' level numbers (c3..c5 -> p3..p5)

``fusion``: ``CSPRep`` (RT-DETR: RepC3 blocks, conv3x3 stride-2 downsampling, activated lateral
convs) or ``RepNCSPELAN4`` (D-FINE: RepNCSPELAN4 blocks, SCDown downsampling, lateral convs
without activation). ``expansion`` and ``depth_mult`` scale the blocks' widths and RepVGG counts
as in the papers' model sizes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import NECKS
from ...structures import ShapeSpec
from ..layers.conv import ConvNormAct
from .csp_blocks import CSPRepBlock, RepNCSPELAN4, SCDown

__all__ = ["HybridEncoder", "AIFIEncoderLayer", "sincos_position_embedding_2d"]

_FFN_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
_FUSIONS = ("CSPRep", "RepNCSPELAN4")


def sincos_position_embedding_2d(height: int, width: int, dim: int, temperature: float = 10000.0, *,
                                 device: torch.device | None = None,
                                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Float[1,H*W,dim], tokens row-major (y outer); channels [sin y | cos y | sin x | cos x],
    frequency i of each quarter = temperature ** (-i / (dim/4)). Computed in float64 (mps: float32)."""
    if dim % 4:
        raise ValueError(f"HybridEncoder: hidden_dim must be divisible by 4 for the 2-D sin-cos "
                         f"position embedding, got {dim}")
    quarter = dim // 4
    compute = torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64
    freq = temperature ** (-torch.arange(quarter, dtype=compute, device=device) / quarter)
    ys = torch.arange(height, dtype=compute, device=device).repeat_interleave(width)
    xs = torch.arange(width, dtype=compute, device=device).repeat(height)
    angle_y, angle_x = ys[:, None] * freq, xs[:, None] * freq
    embed = torch.cat([angle_y.sin(), angle_y.cos(), angle_x.sin(), angle_x.cos()], dim=1)
    return embed.to(dtype)[None]


class _SelfAttention(nn.Module):
    """Multi-head self-attention whose queries and keys get the position embedding, values not.

    Explicit matmul/softmax (not a fused kernel) so the ONNX export is plain operators."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"HybridEncoder: hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, pos: Tensor | None) -> Tensor:
        """x Float[B,S,D], pos Float[1,S,D] or None -> Float[B,S,D]."""
        b, s, d = x.shape
        qk_in = x if pos is None else x + pos
        heads = (b, s, self.num_heads, d // self.num_heads)
        q = self.q_proj(qk_in).view(heads).transpose(1, 2)
        k = self.k_proj(qk_in).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        weights = (q @ k.transpose(-2, -1) * (d // self.num_heads) ** -0.5).softmax(dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, s, d))


class AIFIEncoderLayer(nn.Module):
    """One transformer encoder layer (self-attention + FFN), post-norm unless ``normalize_before``.

    Float[B,S,D] (+ position Float[1,S,D]) -> Float[B,S,D]."""

    def __init__(self, dim: int, *, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.0,
                 activation_dropout: float = 0.0, activation: str = "gelu",
                 normalize_before: bool = False, layer_norm_eps: float = 1e-5):
        super().__init__()
        if activation not in _FFN_ACTIVATIONS:
            raise ValueError(f"HybridEncoder: encoder_activation must be one of "
                             f"{sorted(_FFN_ACTIVATIONS)}, got '{activation}'")
        self.self_attn = _SelfAttention(dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.act = _FFN_ACTIVATIONS[activation]()
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout, self.activation_dropout = dropout, activation_dropout
        self.normalize_before = normalize_before

    def forward(self, x: Tensor, pos: Tensor | None) -> Tensor:
        h = self.norm1(x) if self.normalize_before else x
        x = x + F.dropout(self.self_attn(h, pos), self.dropout, self.training)
        if not self.normalize_before:
            x = self.norm1(x)
        h = self.norm2(x) if self.normalize_before else x
        h = F.dropout(self.act(self.fc1(h)), self.activation_dropout, self.training)
        x = x + F.dropout(self.fc2(h), self.dropout, self.training)
        return x if self.normalize_before else self.norm2(x)


class _AIFI(nn.Module):
    """The encoder layers of one level: Float[B,D,H,W] -> Float[B,D,H,W]."""

    cached_pos: Tensor

    def __init__(self, dim: int, num_layers: int, temperature: float, cached_size: tuple[int, int] | None,
                 **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(AIFIEncoderLayer(dim, **layer_kwargs) for _ in range(num_layers))
        self.dim, self.temperature = dim, temperature
        self.cached_size = cached_size
        if cached_size is not None:   # eval_size: the embedding of the deployment size, computed once
            self.register_buffer("cached_pos", sincos_position_embedding_2d(
                *cached_size, dim, temperature), persistent=False)

    def position(self, height: int, width: int, x: Tensor) -> Tensor:
        if self.cached_size == (height, width):
            return self.cached_pos.to(x.dtype)
        return sincos_position_embedding_2d(height, width, self.dim, self.temperature,
                                            device=x.device, dtype=x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w = x.shape
        pos = self.position(h, w, x)
        tokens = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            tokens = layer(tokens, pos)
        return tokens.transpose(1, 2).reshape(b, d, h, w).contiguous()


@NECKS.register()
class HybridEncoder(nn.Module):
    """RT-DETR / D-FINE hybrid encoder (input projections + AIFI + CCFM) as a detkit neck.

    Args:
        input_shapes: backbone ``output_shape()``.
        in_features: levels used, finest first (default: all, by stride).
        hidden_dim: D, the channels of every output level.
        attention_levels: the levels AIFI runs on (default: the last of ``in_features``).
        num_encoder_layers: transformer layers per attended level (0: no AIFI).
        num_heads, ffn_dim, dropout, activation_dropout, encoder_activation ("gelu", "relu",
            "silu"), normalize_before, layer_norm_eps: the transformer layers.
        pe_temperature: temperature of the 2-D sin-cos position embedding.
        eval_size: optional (H, W) input size whose position embeddings are computed once at
            construction; any other size still gets its own, so outputs never depend on it.
        fusion: "CSPRep" (RT-DETR v1/v2) or "RepNCSPELAN4" (D-FINE).
        expansion: width factor of the fusion blocks (RT-DETR's ``hidden_expansion``).
        depth_mult: RepVGG blocks per fusion block = round(3 * depth_mult).
        activation: activation of the CCFM convs ("silu", "relu", ...).
        norm: norm of every conv ("BN", "SyncBN", "FrozenBN"); batch_norm_eps: its epsilon in
            CCFM (the input projections keep torch's 1e-5, as transformers' ``encoder_input_proj``).
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None = None,
                 hidden_dim: int = 256, attention_levels: Sequence[str] | None = None,
                 num_encoder_layers: int = 1, num_heads: int = 8, ffn_dim: int = 1024,
                 dropout: float = 0.0, activation_dropout: float = 0.0, encoder_activation: str = "gelu",
                 normalize_before: bool = False, layer_norm_eps: float = 1e-5,
                 pe_temperature: float = 10000.0, eval_size: Sequence[int] | None = None,
                 fusion: str = "CSPRep", expansion: float = 1.0, depth_mult: float = 1.0,
                 activation: str = "silu", norm: str = "BN", batch_norm_eps: float = 1e-5):
        super().__init__()
        self.in_features = _check_features(input_shapes, in_features)
        if fusion not in _FUSIONS:
            raise ValueError(f"HybridEncoder: fusion must be one of {list(_FUSIONS)}, got '{fusion}'")
        levels = list(attention_levels) if attention_levels is not None else [self.in_features[-1]]
        bad = [name for name in levels if name not in self.in_features]
        if bad:
            raise ValueError(f"HybridEncoder: attention_levels {bad} are not in in_features "
                             f"{self.in_features}")
        self.attention_levels = levels
        self.hidden_dim, self.fusion = hidden_dim, fusion
        strides = [input_shapes[name].stride for name in self.in_features]
        self._shapes = {f"p{name[1:]}": ShapeSpec(hidden_dim, s)
                        for name, s in zip(self.in_features, strides)}

        self.input_proj = nn.ModuleList(
            ConvNormAct(input_shapes[name].channels, hidden_dim, 1, norm=norm, act=None)
            for name in self.in_features)
        layer_kwargs = dict(num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout,
                            activation_dropout=activation_dropout, activation=encoder_activation,
                            normalize_before=normalize_before, layer_norm_eps=layer_norm_eps)
        self.aifi = nn.ModuleList()
        if num_encoder_layers > 0:
            for name in levels:
                stride = strides[self.in_features.index(name)]
                cached = (None if eval_size is None else
                          (math.ceil(eval_size[0] / stride), math.ceil(eval_size[1] / stride)))
                self.aifi.append(_AIFI(hidden_dim, num_encoder_layers, pe_temperature, cached,
                                       **layer_kwargs))
        self._build_ccfm(len(self.in_features), expansion, round(3 * depth_mult), activation, norm)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    module is m for m in self.input_proj.modules()):
                module.eps = batch_norm_eps

    def _build_ccfm(self, num_levels: int, expansion: float, num_blocks: int, act: str, norm: str) -> None:
        d = self.hidden_dim
        self.lateral_convs, self.fpn_blocks = nn.ModuleList(), nn.ModuleList()
        self.downsample_convs, self.pan_blocks = nn.ModuleList(), nn.ModuleList()
        for _ in range(num_levels - 1):
            if self.fusion == "CSPRep":
                self.lateral_convs.append(ConvNormAct(d, d, 1, norm=norm, act=act))
                self.downsample_convs.append(ConvNormAct(d, d, 3, 2, norm=norm, act=act))
                for blocks in (self.fpn_blocks, self.pan_blocks):
                    blocks.append(CSPRepBlock(2 * d, d, num_blocks=num_blocks, expansion=expansion,
                                              act=act, norm=norm))
            else:
                self.lateral_convs.append(ConvNormAct(d, d, 1, norm=norm, act=None))
                self.downsample_convs.append(SCDown(d, kernel_size=3, stride=2, norm=norm))
                branch = round(expansion * d // 2)
                for blocks in (self.fpn_blocks, self.pan_blocks):
                    blocks.append(RepNCSPELAN4(2 * d, d, split_channels=d, branch_channels=branch,
                                               num_blocks=num_blocks, act=act, norm=norm))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """{cK: Float[B,C_K,H_K,W_K]} -> {pK: Float[B,D,H_K,W_K]}."""
        maps = [proj(features[name]) for proj, name in zip(self.input_proj, self.in_features)]
        for aifi, name in zip(self.aifi, self.attention_levels):
            index = self.in_features.index(name)
            maps[index] = aifi(maps[index])

        # top-down: inner[0] is the coarsest map, each step adds the next finer one
        inner = [maps[-1]]
        for step, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            finer = maps[-2 - step]
            inner[-1] = lateral(inner[-1])
            up = F.interpolate(inner[-1], scale_factor=2.0, mode="nearest")
            if up.shape[-2:] != finer.shape[-2:]:   # level sizes not exact halves (input not /32)
                up = F.interpolate(inner[-1], size=finer.shape[-2:], mode="nearest")
            inner.append(block(torch.cat([up, finer], dim=1)))
        inner.reverse()

        # bottom-up
        outs = [inner[0]]
        for step, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            coarser = inner[step + 1]
            x = down(outs[-1])
            if x.shape[-2:] != coarser.shape[-2:]:
                x = F.interpolate(x, size=coarser.shape[-2:], mode="nearest")
            outs.append(block(torch.cat([x, coarser], dim=1)))
        return dict(zip(self._shapes, outs))


def _check_features(input_shapes: dict[str, ShapeSpec], in_features: Sequence[str] | None) -> list[str]:
    names = (list(in_features) if in_features is not None
             else sorted(input_shapes, key=lambda n: input_shapes[n].stride))
    missing = [n for n in names if n not in input_shapes]
    if not names or missing:
        raise ValueError(f"HybridEncoder: in_features {names} must be a non-empty subset of the "
                         f"backbone outputs {list(input_shapes)}")
    strides = [input_shapes[n].stride for n in names]
    if strides != sorted(strides) or len(set(strides)) != len(strides):
        raise ValueError(f"HybridEncoder: in_features must go from fine to coarse (strides {strides})")
    return names
