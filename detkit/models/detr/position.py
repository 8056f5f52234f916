"""Position helpers of the DETR room: 2-D sine embeddings of a feature grid and box <-> logit maps.

Legend: H x W grid, D channels. Boxes are cxcywh normalised to the padded input.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sine_position_embedding_2d", "inverse_sigmoid", "cxcywh_to_xyxy", "xyxy_to_cxcywh"]


def sine_position_embedding_2d(height: int, width: int, dim: int, temperature: float = 10000.0,
                               *, device: torch.device | None = None,
                               dtype: torch.dtype = torch.float32) -> Tensor:
    """Float[H*W, D] fixed embedding of a row-major grid, laid out ``[sin(y) | cos(y) | sin(x) |
    cos(x)]`` with D/4 frequencies ``temperature ** -(k / (D/4))`` each (RT-DETR's AIFI layer).
    The frequencies are computed in float64 so that large grids keep their precision."""
    if dim % 4:
        raise ValueError(f"sine position embedding: dim {dim} is not divisible by 4")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                            torch.arange(width, dtype=torch.float64, device=device), indexing="ij")
    angle_y = ys.reshape(-1, 1) * omega
    angle_x = xs.reshape(-1, 1) * omega
    return torch.cat([angle_y.sin(), angle_y.cos(), angle_x.sin(), angle_x.cos()], 1).to(dtype)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x kept above ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    center, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([center - 0.5 * size, center + 0.5 * size], -1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(low + high) / 2, high - low], -1)
