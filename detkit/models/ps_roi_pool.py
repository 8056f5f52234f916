"""Position-sensitive RoI average pooling (R-FCN, Dai et al. 2016), in pure PyTorch.

Legend: B images, k x k bins, O outputs (channels per bin group), C = k * k * O input channels,
H x W the feature map, R RoIs of the batch.

Bin (i, j) of an RoI averages channel ``(o * k + i) * k + j`` over every feature cell the bin
touches: the RoI is scaled to map coordinates (``spatial_scale``), split into k x k equal bins,
and a bin spanning ``[y0, y1) x [x0, x1)`` reads cells ``floor(y0) .. ceil(y1) - 1`` (the
released R-FCN code's floor/ceil bin edges), clipped to the map. Cells of the last row and column
are read like any other.

Why not ``torchvision.ops.ps_roi_pool``: its forward kernels (CPU and CUDA) clip each bin's end
to ``H - 1`` / ``W - 1`` where the start is clipped to ``0`` and the end is exclusive, so the
last row and column are never read. An RoI in the last cell then has only empty bins and votes
0 for every class, and the backward kernels do not clip the same way, so the gradient does not
match the forward pass (``gradcheck`` fails for border RoIs).

The bin sums come from a summed-area table (two cumulative sums) read at four corners per bin,
so the cost is one pass over the map plus O(R * C) gathers, and autograd provides the exact
gradient with respect to the map (RoI coordinates get none: bin edges are rounded to cells).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ps_roi_avg_pool"]

# The smallest RoI side in map cells: a degenerate (zero-size) RoI still reads the cell it is in.
MIN_ROI_SIZE = 0.1


def _rois_with_batch_index(rois: Tensor | list[Tensor]) -> tuple[Tensor, Tensor]:
    """Float[R,5] (batch index, x0, y0, x1, y1) or a list of Float[R_b,4] -> Float[R,4], Int64[R]."""
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois: expected Float[R, 5] or a list of Float[R_b, 4], "
                             f"got {tuple(rois.shape)}")
        return rois[:, 1:], rois[:, 0].to(torch.int64)
    if not rois:
        raise ValueError("rois: an empty list (one Float[R_b, 4] tensor per image is needed)")
    index = [torch.full((len(r),), b, dtype=torch.int64, device=r.device) for b, r in enumerate(rois)]
    return torch.cat(list(rois)), torch.cat(index)


def _bin_edges(start: Tensor, end: Tensor, bins: int, limit: int) -> tuple[Tensor, Tensor]:
    """Float[R] RoI side in map cells -> Int64[R,k] first cell and one past the last cell per bin."""
    size = (end - start).clamp(min=MIN_ROI_SIZE)
    steps = torch.arange(bins + 1, device=start.device, dtype=start.dtype) / bins
    edges = start[:, None] + steps[None, :] * size[:, None]          # [R, k+1]
    lo = edges[:, :-1].floor().clamp(0, limit).to(torch.int64)
    hi = edges[:, 1:].ceil().clamp(0, limit).to(torch.int64)
    return lo, hi


def ps_roi_avg_pool(maps: Tensor, rois: Tensor | list[Tensor], group_size: int,
                    spatial_scale: float) -> Tensor:
    """Float[B, k*k*O, H, W] maps, RoIs (xyxy input pixels) -> Float[R, O, k, k] bin averages.

    ``rois``: Float[R, 5] with the image index first, or one Float[R_b, 4] per image. A bin that
    lies wholly outside the map is empty and pools 0.
    """
    _, channels, height, width = maps.shape
    k = int(group_size)
    if k < 1 or channels % (k * k):
        raise ValueError(f"ps_roi_avg_pool: {channels} channels are not a multiple of "
                         f"group_size^2 = {k * k}")
    outputs = channels // (k * k)
    boxes, image = _rois_with_batch_index(rois)
    # float16 / bfloat16 sums over a whole map would lose too many digits
    work = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    table = F.pad(work.cumsum(2).cumsum(3), (1, 0, 1, 0)).reshape(-1)  # [B*C*(H+1)*(W+1)]
    scaled = boxes.to(work.dtype) * spatial_scale
    x_lo, x_hi = _bin_edges(scaled[:, 0], scaled[:, 2], k, width)
    y_lo, y_hi = _bin_edges(scaled[:, 1], scaled[:, 3], k, height)
    channel = torch.arange(channels, device=maps.device).view(1, outputs, k, k)
    base = (image.view(-1, 1, 1, 1) * channels + channel) * (height + 1)   # [R, O, k, k]

    def corner(rows: Tensor, cols: Tensor) -> Tensor:
        return table[(base + rows[:, None, :, None]) * (width + 1) + cols[:, None, None, :]]

    sums = corner(y_hi, x_hi) - corner(y_lo, x_hi) - corner(y_hi, x_lo) + corner(y_lo, x_lo)
    area = (y_hi - y_lo)[:, :, None] * (x_hi - x_lo)[:, None, :]             # [R, k, k]
    return (sums / area.clamp(min=1)[:, None].to(sums.dtype)).to(maps.dtype)
