"""Vision Transformer in DINOv2's layout, with RF-DETR / LW-DETR windowed attention.

Legend: B images, D embed_dim, p patch_size, (gh, gw) = (H // p, W // p) the patch grid,
P prefix tokens (CLS + registers), s windows per side (s*s windows), T tokens of one sequence.

One class covers four transformers modules (see ``detkit.models.convert.hf_vit``):

* ``Dinov2Model`` / ``Dinov2Backbone``: CLS token, LayerScale, optional SwiGLU FFN, position
  embeddings interpolated bicubically (``pos_embed_antialias=False``), a final LayerNorm on the
  outputs, no windows;
* ``Dinov2WithRegistersModel``: the same with register tokens after the CLS token and
  ``pos_embed_antialias=True``;
* ``RfDetrDinov2Backbone``: DINOv2 with ``windows_per_side`` > 1. The patch grid is cut into s*s
  windows; each window carries its own copy of the prefix tokens. Blocks in
  ``window_block_indices`` attend within a window; the others attend over all windows of an image
  at once (all s*s prefix copies included, as RF-DETR does);
* ``LwDetrViTBackbone``: no CLS token (``cls_token=False``), a key projection without bias
  (``key_bias=False``), LayerScale initialised to 0.1, patch 16, no final norm.

Window partition: detkit cuts a true partition of any grid whose sides are multiples of s (window
(i, j) holds rows i*gh/s.. and columns j*gw/s..). transformers' RF-DETR backbone reshapes the
token grid as if it were (s, gw/s, s, gh/s), which is the same partition when gh == gw (the only
sizes RF-DETR is trained and exported at) and a scramble of the grid otherwise; LW-DETR's is a
true partition at every size. So detkit equals RF-DETR on square grids and stays a correct
windowed ViT on the others. A grid that s does not divide is a :class:`WindowGridError` naming
valid sizes (``size_divisibility`` = p * s is the padding a detector needs).

Export: the TorchScript-based ONNX exporter gives a graph for the traced input size (the patch
grid and windows are Python sizes); antialiased position embeddings are resampled there with two
constant matrices, since ONNX (opset <= 17) has no antialiased bicubic. ``fixed_export_size``
makes ``tools/export.py --dynamic`` an error naming the valid fixed sizes.

Outputs: ``stage{i}`` (the tokens after ``i`` blocks; 0 = the embeddings), each
Float[B, D, gh, gw], stride p.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DetkitError
from ...registry import BACKBONES
from ...structures import ShapeSpec
from ..pretrained import read_backbone_weights
from ..utils import load_state_dict_checked

__all__ = ["ViT", "WindowGridError", "interpolate_pos_embed", "window_partition", "window_merge"]

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


class WindowGridError(DetkitError, ValueError):
    """An input whose patch grid the windows do not divide; the message names valid sizes."""


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], *, antialias: bool) -> Tensor:
    """Float[1, G*G, D] square-grid embeddings -> Float[1, gh*gw, D], bicubic as DINOv2.

    The interpolation runs in float32 (bicubic in half precision shifts the embeddings) and is
    skipped only at the pretraining grid outside tracing, so exported graphs follow the input.
    """
    side = math.isqrt(pos_embed.shape[1])
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if tuple(grid) == (side, side) and not exporting:
        return pos_embed
    dim = pos_embed.shape[-1]
    square = pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    if antialias and exporting:
        # ONNX (opset <= 17) has no antialiased bicubic: the same resampling as two constant
        # matrices, exact for the traced size (such graphs are static in the input size)
        rows, cols = _resize_matrix(side, grid[0]), _resize_matrix(side, grid[1])
        resized = torch.einsum("hi,bcij,wj->bchw", rows, square, cols)
    else:
        resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    return resized.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def _resize_matrix(src: int, dst: int) -> Tensor:
    """Float[dst, src]: antialiased bicubic resampling of a length-``src`` signal, as a constant.

    Bicubic resampling is linear and separable, so resizing the unit vectors gives its matrix;
    going through a Python list keeps the computation out of a traced graph.
    """
    with torch.no_grad():
        # two identical columns: torch's antialiased kernel degenerates on a width-1 input
        units = torch.eye(src).reshape(src, 1, src, 1).expand(src, 1, src, 2)
        columns = F.interpolate(units, size=(dst, 2), mode="bicubic", align_corners=False, antialias=True)
    return torch.tensor(columns[..., 0].reshape(src, dst).t().tolist())


def window_partition(tokens: Tensor, grid: tuple[int, int], windows_per_side: int) -> Tensor:
    """Float[B, gh*gw, D] (row-major grid) -> Float[B*s*s, (gh/s)*(gw/s), D].

    Window order: image-major, then window row, window column; tokens row-major inside.
    """
    b, _, d = tokens.shape
    s, (gh, gw) = windows_per_side, grid
    x = tokens.reshape(b, s, gh // s, s, gw // s, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * s * s, (gh // s) * (gw // s), d)


def window_merge(windows: Tensor, grid: tuple[int, int], windows_per_side: int) -> Tensor:
    """Inverse of :func:`window_partition`: Float[B*s*s, T_w, D] -> Float[B, D, gh, gw]."""
    s, (gh, gw) = windows_per_side, grid
    d = windows.shape[-1]
    x = windows.reshape(-1, s, s, gh // s, gw // s, d).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(-1, d, gh, gw)


def _drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x / keep * torch.floor(mask + keep)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` of a residual branch (CaiT / DINOv2)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with separate q / k / v projections: Float[N,T,D] -> Float[N,T,D]."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, key_bias: bool, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias and key_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape

        def heads(proj: nn.Linear) -> Tensor:
            return proj(x).reshape(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    """fc1 -> activation -> fc2, hidden ``int(dim * mlp_ratio)``."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), _ACTIVATIONS[act](), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); hidden = 2/3 of the MLP's, rounded up to a multiple of 8 (DINOv2)."""

    def __init__(self, dim: int, mlp_hidden: int):
        super().__init__()
        hidden = (int(mlp_hidden * 2 / 3) + 7) // 8 * 8
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; ``windowed`` blocks attend within each window, the others
    over all ``num_windows`` windows of an image. Input / output Float[B*num_windows, T, D]."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, ffn: str, act: str, qkv_bias: bool,
                 key_bias: bool, layer_scale_init: float | None, eps: float, drop_path: float,
                 attn_dropout: float, windowed: bool):
        super().__init__()
        self.windowed, self.drop_path = windowed, drop_path
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, key_bias=key_bias, dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.ffn: nn.Module = SwiGLU(dim, hidden) if ffn == "swiglu" else MLP(dim, hidden, act)
        self.ls1: nn.Module = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.ls2: nn.Module = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor, num_windows: int) -> Tensor:
        n, t, d = x.shape
        h = self.norm1(x)
        if not self.windowed and num_windows > 1:
            h = h.reshape(n // num_windows, num_windows * t, d)   # one sequence per image
        h = self.attn(h).reshape(n, t, d)
        x = x + _drop_path(self.ls1(h), self.drop_path, self.training)
        return x + _drop_path(self.ls2(self.ffn(self.norm2(x))), self.drop_path, self.training)


@BACKBONES.register()
class ViT(nn.Module):
    """DINOv2-layout ViT returning intermediate blocks as feature maps (see the module doc).

    Args:
        patch_size: p (14 DINOv2 / RF-DETR, 16 LW-DETR); also the stride of every output.
        embed_dim, depth, num_heads, mlp_ratio: D, the number of blocks built, heads, FFN ratio.
        out_indices: blocks whose outputs are returned as ``stage{i}`` (i in 0..depth).
        pretrain_image_size: the position embeddings cover a (size // p)^2 grid.
        pos_embed_antialias: antialias of the bicubic interpolation (DINOv2 False, DINOv2 with
            registers and RF-DETR True, LW-DETR False).
        cls_token / num_register_tokens: prefix tokens (LW-DETR has none).
        use_mask_token: a learned ``mask_token`` for masked-patch pre-training (``forward``'s
            ``masked_positions``); off for detection, where it would be an unused parameter.
        ffn: ``mlp`` or ``swiglu``; act: the MLP's activation (``gelu``, ``silu``, ``relu``).
        qkv_bias / key_bias: biases of q, v (and k unless ``key_bias`` is False).
        layer_scale_init: LayerScale's initial value, None for no LayerScale.
        final_norm: apply the final LayerNorm ``norm`` to every output (DINOv2's backbone does).
        windows_per_side: s; 1 turns windows off. window_block_indices: 0-based windowed blocks.
        drop_path_rate, attn_dropout: stochastic depth (the same in every block) and attention
            dropout, training only.
        weights: a detkit / tools/pretrain.py checkpoint file, or a transformers ``Dinov2Model``
            (with registers) folder converted on load (its config must match these arguments).
    """

    fixed_export_size = True     # see the module docstring, "Export"

    def __init__(self, *, patch_size: int = 14, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, out_indices: Sequence[int] = (12,), pretrain_image_size: int = 518,
                 pos_embed_antialias: bool = False, cls_token: bool = True, num_register_tokens: int = 0,
                 use_mask_token: bool = False, ffn: str = "mlp", act: str = "gelu", qkv_bias: bool = True,
                 key_bias: bool = True, layer_scale_init: float | None = 1.0, layer_norm_eps: float = 1e-6,
                 final_norm: bool = True, windows_per_side: int = 1, window_block_indices: Sequence[int] = (),
                 drop_path_rate: float = 0.0, attn_dropout: float = 0.0, in_channels: int = 3,
                 weights: str | None = None):
        super().__init__()
        self._check_args(depth, out_indices, window_block_indices, windows_per_side, ffn, act,
                         num_register_tokens, cls_token)
        self.patch_size, self.embed_dim = int(patch_size), int(embed_dim)
        self.out_indices = sorted({int(i) for i in out_indices})
        self.windows_per_side, self.pos_embed_antialias = int(windows_per_side), bool(pos_embed_antialias)
        self.num_prefix = int(cls_token) + int(num_register_tokens)
        # padding a detector needs so that every window gets whole patches
        self.size_divisibility = self.patch_size * self.windows_per_side

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        grid = int(pretrain_image_size) // self.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None
        windowed = {int(i) for i in window_block_indices} if self.windows_per_side > 1 else set()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, ffn=ffn, act=act, qkv_bias=qkv_bias,
                  key_bias=key_bias, layer_scale_init=layer_scale_init, eps=layer_norm_eps,
                  drop_path=drop_path_rate, attn_dropout=attn_dropout, windowed=i in windowed)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps) if final_norm else None
        self._init_weights()
        if weights is not None:
            self.load_weights(weights)

    @staticmethod
    def _check_args(depth, out_indices, window_blocks, windows_per_side, ffn, act, registers, cls) -> None:
        bad = [i for i in out_indices if not 0 <= int(i) <= depth]
        if not list(out_indices) or bad:
            raise ValueError(f"ViT: out_indices must be non-empty, each in 0..depth={depth}, "
                             f"got {list(out_indices)}")
        bad = [i for i in window_blocks if not 0 <= int(i) < depth]
        if bad:
            raise ValueError(f"ViT: window_block_indices {bad} outside the blocks 0..{depth - 1}")
        if int(windows_per_side) < 1:
            raise ValueError(f"ViT: windows_per_side must be >= 1, got {windows_per_side}")
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ViT: ffn must be 'mlp' or 'swiglu', got '{ffn}'")
        if act not in _ACTIVATIONS:
            raise ValueError(f"ViT: act must be one of {', '.join(_ACTIVATIONS)}, got '{act}'")
        if registers and not cls:
            raise ValueError("ViT: register tokens need cls_token=True (they follow the CLS token)")

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.cls_token, self.cls_pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    # ---------------------------------------------------------------------------------- weights
    def load_weights(self, weights: str) -> None:
        """Load a detkit state dict file or a transformers DINOv2 folder (strict, shapes checked)."""
        if os.path.isdir(weights):
            from ..convert.hf_vit import read_dinov2_folder  # the converter imports this module

            own = dict(depth=len(self.blocks), use_mask_token=self.mask_token is not None,
                       final_norm=self.norm is not None)
            state = read_dinov2_folder(weights, prefix="", target=own)
        else:
            state = read_backbone_weights(weights, "ViT")
        load_state_dict_checked(self, state, strict=True, source=weights)

    # ---------------------------------------------------------------------------------- forward
    def output_shape(self) -> dict[str, ShapeSpec]:
        return {f"stage{i}": ShapeSpec(channels=self.embed_dim, stride=self.patch_size)
                for i in self.out_indices}

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(gh, gw) of an input; a WindowGridError when the windows do not divide it."""
        p, s = self.patch_size, self.windows_per_side
        gh, gw = height // p, width // p
        if gh == 0 or gw == 0 or gh % s or gw % s:
            unit = p * s
            raise WindowGridError(
                f"ViT: input {height}x{width} gives a {gh}x{gw} grid of {p}-pixel patches, which "
                f"{s}x{s} windows do not divide; valid sizes are multiples of {unit} (patch {p} x "
                f"{s} windows per side), e.g. {max(1, height // unit) * unit}x{max(1, width // unit) * unit}"
                f" (a detector pads to them with size_divisibility: {unit})")
        return gh, gw

    def embed(self, x: Tensor, masked_positions: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Float[B,3,H,W] -> (Float[B*s*s, P + gh*gw/(s*s), D] windowed tokens, (gh, gw)).

        ``masked_positions`` Bool[B, gh*gw] replaces those patches by ``mask_token``.
        """
        grid = self.patch_grid(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        if masked_positions is not None:
            if self.mask_token is None:
                raise ValueError("ViT: masked_positions needs use_mask_token=True")
            tokens = torch.where(masked_positions.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, grid, antialias=self.pos_embed_antialias)
        tokens = window_partition(tokens, grid, self.windows_per_side)
        prefix = []
        if self.cls_token is not None and self.cls_pos_embed is not None:
            prefix.append(self.cls_token + self.cls_pos_embed)
        if self.register_tokens is not None:   # registers get no position embedding (DINOv2)
            prefix.append(self.register_tokens)
        if prefix:
            # every window carries a copy of the prefix tokens (RF-DETR), identical across images
            shared = torch.cat(prefix, 1).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([shared, tokens], 1)
        return tokens, grid

    def final_tokens(self, x: Tensor, masked_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Float[B,3,H,W] -> (Float[B,D] CLS, Float[B, gh*gw, D] patches) after every block and the
        final norm: the representation DINO / iBOT pre-training uses (``detkit.ssl``, its hook).
        With windows, the CLS copies of an image's windows are averaged."""
        if self.cls_token is None:
            raise ValueError("ViT: final_tokens needs cls_token=True (the pooled representation is CLS)")
        tokens, grid = self.embed(x, masked_positions)
        num_windows = self.windows_per_side ** 2
        for block in self.blocks:
            tokens = block(tokens, num_windows)
        if self.norm is not None:
            tokens = self.norm(tokens)
        cls = tokens[:, 0].reshape(-1, num_windows, self.embed_dim).mean(1)
        patches = window_merge(tokens[:, self.num_prefix:], grid, self.windows_per_side)
        return cls, patches.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor, masked_positions: Tensor | None = None) -> dict[str, Tensor]:
        """Float[B,3,H,W] (normalised) -> {stage{i}: Float[B, D, H // p, W // p]}."""
        tokens, grid = self.embed(x, masked_positions)
        num_windows = self.windows_per_side ** 2
        outputs: dict[str, Tensor] = {}
        for i in range(self.out_indices[-1] + 1):
            if i > 0:
                tokens = self.blocks[i - 1](tokens, num_windows)
            if i in self.out_indices:
                out = tokens if self.norm is None else self.norm(tokens)
                outputs[f"stage{i}"] = window_merge(out[:, self.num_prefix:], grid, self.windows_per_side)
        return outputs
