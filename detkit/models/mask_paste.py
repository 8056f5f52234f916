"""Paste per-detection M x M mask probabilities into the image, batched (no per-detection loop).

Legend: N detections, M mask resolution (28 for Mask R-CNN), H x W the image the masks are
pasted into. Boxes are xyxy absolute pixels of that image.

The result equals torchvision's ``paste_masks_in_image`` (the Detectron convention): each
M x M mask is padded by one zero pixel on every side, its box is enlarged by the same factor
``(M + 2) / M`` and truncated to integers ``(x0, y0, x1, y1)``, the padded mask is resized
bilinearly (``align_corners=False``) to ``(y1 - y0 + 1) x (x1 - x0 + 1)`` pixels and written
at ``(y0, x0)``; what falls outside the image is cut off, so boxes at or across the image
border paste exactly the part that is inside.

Bilinear resizing is separable: ``resized = Wy @ padded @ Wx^T`` with one interpolation matrix
per axis. Writing each detection's matrices directly in image coordinates (rows of pixels
outside its box are zero) turns the whole paste into two batched matrix products, one for all
detections at once, instead of one ``interpolate`` and one image-sized copy per detection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_masks", "expand_boxes", "interpolation_matrix"]

_GROUP = 8   # detections per matrix product (see paste_masks)


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Float[N,4] xyxy boxes scaled by ``scale`` about their centres (same float steps as
    torchvision's ``expand_boxes``, so that the integer boxes derived from them agree)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def interpolation_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Float[N, out_size, in_size]: row ``p`` holds the bilinear (``align_corners=False``) weights
    of the ``in_size`` source pixels for image pixel ``p``, for a source stretched over the
    ``length[n]`` pixels that start at ``start[n]`` (Int64[N]); rows outside that span are zero.

    The source coordinate of output pixel ``j`` is ``max((j + 0.5) * in / length - 0.5, 0)``
    and its two neighbours are clamped to the last source pixel, as in ``F.interpolate``.
    """
    pixel = torch.arange(out_size, device=start.device)
    local = pixel[None, :] - start[:, None]                                   # Int64[N, out]
    inside = (local >= 0) & (local < length[:, None])
    ratio = torch.tensor(float(in_size), dtype=torch.float32, device=start.device) / length.float()
    # One rounding of ``(j + 0.5) * ratio - 0.5``, as the fused multiply-add of torch's kernel:
    # the float64 product of two float32 numbers is exact, so only the final cast rounds.
    src = ((local.double() + 0.5) * ratio.double()[:, None] - 0.5).float().clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = (src - low.float()).clamp(0, 1)
    weights = torch.zeros(start.shape[0], out_size, in_size, device=start.device)
    keep = inside.float()
    weights.scatter_add_(2, low[..., None], ((1 - frac) * keep)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * keep)[..., None])
    return weights


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], *,
                threshold: float | None = 0.5, padding: int = 1) -> Tensor:
    """Paste Float[N,M,M] mask probabilities at Float[N,4] xyxy ``boxes`` in an H x W image.

    Returns Bool[N,H,W] (``probability > threshold``) or, with ``threshold=None``, the
    Float[N,H,W] probabilities (zero outside each box). Equal to torchvision's
    ``paste_masks_in_image(masks[:, None], boxes, image_size, padding)[:, 0]`` (see module doc).
    """
    height, width = int(image_size[0]), int(image_size[1])
    num, size = masks.shape[0], masks.shape[-1]
    if num == 0:
        dtype = torch.bool if threshold is not None else torch.float32
        return torch.zeros((0, height, width), dtype=dtype, device=masks.device)
    padded = F.pad(masks.float(), (padding,) * 4)                              # Float[N, M+2p, M+2p]
    grid = size + 2 * padding
    ints = expand_boxes(boxes.float(), float(grid) / size).to(torch.int64)
    x0, y0, x1, y1 = ints.unbind(1)
    wy = interpolation_matrix(y0, (y1 - y0 + 1).clamp(min=1), grid, height)   # Float[N, H, M+2p]
    wx = interpolation_matrix(x0, (x1 - x0 + 1).clamp(min=1), grid, width)    # Float[N, W, M+2p]
    # Source pixels in reverse order: a sequential multiply-add then sums the two neighbours of
    # each output pixel in the order of torch's bilinear kernel (far neighbour first), so that
    # on CPU the probabilities equal torchvision's bit for bit, but for ~1e-5 of them (1 ulp).
    padded, wx, wy = padded.flip(1, 2), wx.flip(2), wy.flip(2)
    across = torch.bmm(padded, wx.transpose(1, 2))                             # Float[N, M+2p, W]
    out = torch.zeros((num, height, width), dtype=torch.bool if threshold is not None else torch.float32,
                      device=masks.device)
    # Detections sorted by top edge and taken a few at a time: each group's product covers only
    # the rows and columns its boxes span, not the whole image.
    order = torch.argsort(y0)
    spans = torch.stack([y0, y1 + 1, x0, x1 + 1], dim=1)[order]
    for start in range(0, num, _GROUP):
        idx = order[start:start + _GROUP]
        part = spans[start:start + _GROUP]
        r0, c0 = (max(int(v), 0) for v in part[:, [0, 2]].min(0).values.tolist())
        r1, c1 = (int(v) for v in part[:, [1, 3]].max(0).values.tolist())
        r1, c1 = min(r1, height), min(c1, width)
        if r1 <= r0 or c1 <= c0:
            continue
        block = torch.bmm(wy[idx, r0:r1], across[idx, :, c0:c1])
        out[idx, r0:r1, c0:c1] = block > threshold if threshold is not None else block
    return out
