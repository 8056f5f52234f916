"""Anchor boxes for dense heads (RPN, RetinaNet-style heads).

Legend: L feature levels, A anchors per location (sizes x ratios of that level), Hi x Wi the
grid of level i, si its stride in input pixels. Boxes are xyxy absolute input pixels.

An anchor of size ``s`` and aspect ratio ``r = h / w`` has ``w = s / sqrt(r)``, ``h = s * sqrt(r)``
(area ``s**2``) and is centred on the top-left corner of its grid cell (``x = j * si``), with the
corners rounded to whole pixels. These are the conventions of torchvision's ``AnchorGenerator``,
so detkit's anchors are identical to it: always with ``stride_mode="torchvision"``, and with the
default geometric strides whenever every level's grid is exact (tests/models/test_anchors.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "STRIDE_MODES", "cell_anchors", "grid_anchors"]

STRIDE_MODES = ("geometric", "torchvision")


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Zero-centred anchors Float[len(ratios) * len(sizes), 4], ratio-major order.

    Corners are rounded to integers (as torchvision and the original Detectron do), which keeps
    anchors pixel-aligned and makes converted torchvision weights see identical anchors.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    widths = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


def grid_anchors(base: Tensor, grid_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Tile Float[A,4] ``base`` anchors over a Hi x Wi grid -> Float[Hi*Wi*A, 4].

    Order is (row, column, anchor): location-major, the layout of a flattened
    ``[B, A*k, Hi, Wi]`` head output permuted to ``[B, Hi, Wi, A, k]``.
    ``stride`` is (stride_y, stride_x) in pixels.
    """
    (height, width), (stride_y, stride_x) = grid_size, stride
    device = base.device
    shifts_x = torch.arange(width, dtype=torch.int32, device=device) * stride_x
    shifts_y = torch.arange(height, dtype=torch.int32, device=device) * stride_y
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """Anchors for L feature levels; level i uses ``sizes[i]`` x ``aspect_ratios[i]``.

    Args:
        sizes: per level, the anchor sizes (sqrt of area) in input pixels, e.g.
            ``[[32], [64], [128], [256], [512]]`` for FPN P2-P6 or ``[[32, 64, 128, 256, 512]]``
            for a single C4 map.
        aspect_ratios: per level ratios ``h / w``; a flat list is used for every level.
        strides: per level stride in input pixels (``ShapeSpec.stride``).
        stride_mode: how a level's stride is found from its grid.
            ``"geometric"`` (default, for models trained in detkit): the configured ``strides``,
            so anchor ``j`` of a level is centred at ``j * si`` whatever the image size.
            ``"torchvision"``: ``padded_size // grid_size`` per axis, what torchvision's
            ``AnchorGenerator`` does. The two differ whenever a level's grid was rounded up, e.g.
            the max-pooled P6 of a 512 x 800 batch has 13 columns and stride 800 // 13 = 61, not
            64 (and P6 of the COCO recipe's 800 x 1344 batches has 800 // 13 = 61 rows). Weights
            converted from torchvision were trained with the rounded strides; the converter
            (``detkit.models.convert``) switches them on so that they reproduce torchvision's
            detections on every image size.
    """

    def __init__(self, *, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence,
                 strides: Sequence[int], stride_mode: str = "geometric"):
        super().__init__()
        if not aspect_ratios or not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = [list(aspect_ratios)] * len(sizes)
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(f"anchor sizes ({len(sizes)} levels), aspect_ratios "
                             f"({len(aspect_ratios)}) and feature strides ({len(strides)}) must "
                             f"have one entry per feature level")
        self.sizes = [list(map(float, s)) for s in sizes]
        self.aspect_ratios = [list(map(float, r)) for r in aspect_ratios]
        self.strides = [int(s) for s in strides]
        if stride_mode not in STRIDE_MODES:
            raise ValueError(f"stride_mode must be one of {', '.join(STRIDE_MODES)}, got {stride_mode!r}")
        self.stride_mode = stride_mode
        for i, base in enumerate(cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)):
            self.register_buffer(f"cell_anchors_{i}", base, persistent=False)
        self._cache: dict = {}

    @property
    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def level_strides(self, grid_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """(stride_y, stride_x) per level; see ``stride_mode``."""
        if self.stride_mode == "geometric":
            return [(s, s) for s in self.strides]
        # The finest level's grid is exact (the padded size is a multiple of the coarsest stride).
        pad_h = grid_sizes[0][0] * self.strides[0]
        pad_w = grid_sizes[0][1] * self.strides[0]
        return [(pad_h // h, pad_w // w) for h, w in grid_sizes]

    def forward(self, grid_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Anchors Float[Hi*Wi*A, 4] per level for the given (Hi, Wi) grids (same for every image)."""
        grid_sizes = [(int(h), int(w)) for h, w in grid_sizes]
        if len(grid_sizes) != len(self.sizes):
            raise ValueError(f"AnchorGenerator has {len(self.sizes)} levels but got "
                             f"{len(grid_sizes)} feature maps")
        base = [getattr(self, f"cell_anchors_{i}") for i in range(len(self.sizes))]
        key = (tuple(grid_sizes), base[0].device, self.stride_mode)
        if key not in self._cache:
            if len(self._cache) > 16:  # multi-scale training: keep the cache bounded
                self._cache.clear()
            strides = self.level_strides(grid_sizes)
            self._cache[key] = [grid_anchors(b, g, s).to(torch.float32)
                                for b, g, s in zip(base, grid_sizes, strides)]
        return self._cache[key]
