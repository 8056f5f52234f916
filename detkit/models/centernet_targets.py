"""CenterNet ("Objects as Points") training targets and box decoding.

Legend: N objects, C classes, B images, H x W output (heatmap) size, K kept peaks, s output stride
(input pixels per heatmap cell). Boxes are ``xyxy`` in input-image pixels unless a name says
``feat`` (heatmap cells, i.e. pixels / s).

Targets (Zhou et al. 2019, with CornerNet's gaussian):

* every non-ignored object puts an unnormalised gaussian on the heatmap of its class, centred on
  the integer cell ``floor(centre / s)``; the peak is exactly 1, overlapping gaussians of one class
  keep the element-wise max;
* the gaussian radius comes from :func:`gaussian_radius` on the box size in cells rounded up,
  ``ceil(h), ceil(w)`` (as CenterNet's code does; ``radius_sizes="float"`` uses the float sizes),
  truncated to an integer ``r``, with ``sigma = (2r + 1) / 6`` and support ``|dx|, |dy| <= r``;
* size ``wh`` (cells) and sub-cell ``offset = centre / s - floor(centre / s)`` are regressed only at
  the integer centres, listed by flat index ``b * H * W + y * W + x``;
* crowd (and VOC difficult) boxes are never rendered as positives; optionally their cells are
  marked ``ignore`` so the negative focal term does not punish a detection inside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_radius", "splat_gaussians", "CenterNetTargets", "render_targets",
           "decode_heatmap", "RADIUS_FORMULAS", "RADIUS_SIZES"]

RADIUS_FORMULAS = ("cornernet", "corrected")
# "ceil": the reference code's gaussian_radius((ceil(h), ceil(w))); "float": the float box size
# (detkit's earlier form: continuous in the size, kept to reproduce results trained with it).
RADIUS_SIZES = ("ceil", "float")


def gaussian_radius(heights: Tensor, widths: Tensor, min_overlap: float = 0.7,
                    formula: str = "cornernet") -> Tensor:
    """Radius (cells, float) within which a shifted corner pair still gives IoU >= ``min_overlap``.

    Three cases of a box ``w x h`` whose corners move by ``r`` (CornerNet, Law & Deng 2018):
    (1) both corners move the same way (box translated by ``(r, r)``):
    ``r^2 - (h+w) r + wh(1-o)/(1+o) = 0``; (2) both move inwards: ``4r^2 - 2(h+w) r + (1-o)wh = 0``;
    (3) both move outwards: ``4o r^2 + 2o(h+w) r + (o-1)wh = 0``. The radius is the min over cases.

    ``formula="cornernet"`` (default) reproduces the expression of CornerNet's released code, which
    CenterNet reuses verbatim and on which every published CenterNet result rests: it takes
    ``(b + sqrt(D)) / 2`` in each case (with case 3 written with ``b = -2o(h+w)``), i.e. not the
    roots of the equations above. Its minimum is case 3 scaled by ``4o`` (0.27 x side of a square
    box for o = 0.7). ``formula="corrected"`` solves the three quadratics (smallest non-negative root), giving
    radii about 3.3x smaller (0.082 x side of a square box); with CenterNet's integer truncation most small
    objects then get ``r = 0`` (a single positive cell and no penalty reduction around it).

    Args:
        heights, widths: Float[N] box sizes (cells).
    Returns:
        Float[N] radii (not yet truncated).
    """
    if formula not in RADIUS_FORMULAS:
        raise ValueError(f"unknown radius formula '{formula}'; expected one of {RADIUS_FORMULAS}")
    h, w, o = heights.float(), widths.float(), float(min_overlap)
    if not 0.0 < o < 1.0:
        raise ValueError(f"min_overlap must be in (0, 1), got {min_overlap}")
    s, area = h + w, h * w
    if formula == "cornernet":
        # CornerNet code: (b + sqrt(b^2 - 4ac)) / 2 for (a, b, c) = (1, s, .), (4, 2s, .), (4o, -2os, .)
        r1 = (s + torch.sqrt(s ** 2 - 4 * area * (1 - o) / (1 + o))) / 2
        r2 = (2 * s + torch.sqrt(4 * s ** 2 - 16 * (1 - o) * area)) / 2
        r3 = (-2 * o * s + torch.sqrt(4 * o ** 2 * s ** 2 - 16 * o * (o - 1) * area)) / 2
    else:  # the root that bounds r in each case
        r1 = (s - torch.sqrt(s ** 2 - 4 * area * (1 - o) / (1 + o))) / 2
        r2 = (2 * s - torch.sqrt(4 * s ** 2 - 16 * (1 - o) * area)) / 8
        r3 = (-2 * o * s + torch.sqrt(4 * o ** 2 * s ** 2 - 16 * o * (o - 1) * area)) / (8 * o)
    return torch.minimum(torch.minimum(r1, r2), r3)


def splat_gaussians(heatmap: Tensor, centers: Tensor, radii: Tensor, labels: Tensor) -> Tensor:
    """Draw one gaussian per object into ``heatmap`` (in place), keeping the element-wise max.

    Args:
        heatmap: Float[C,H,W].
        centers: Int64[N,2] integer ``(x, y)`` cells (may lie outside the map: nothing is drawn).
        radii: Int64[N] integer radii r >= 0; sigma = (2r + 1) / 6, support |dx|, |dy| <= r.
        labels: Int64[N] class of each object.
    Returns:
        ``heatmap``. The value at each centre is exactly 1 (exp(0) * exp(0)).
    """
    num_classes, height, width = heatmap.shape
    if centers.numel() == 0:
        return heatmap
    sigma = (2 * radii.float() + 1) / 6
    # separable: exp(-(dx^2 + dy^2) / 2s^2) = exp(-dx^2 / 2s^2) * exp(-dy^2 / 2s^2)
    dx = torch.arange(width, device=heatmap.device)[None] - centers[:, :1]   # [N,W]
    dy = torch.arange(height, device=heatmap.device)[None] - centers[:, 1:]  # [N,H]
    gx = torch.exp(-dx.float() ** 2 / (2 * sigma[:, None] ** 2)) * (dx.abs() <= radii[:, None])
    gy = torch.exp(-dy.float() ** 2 / (2 * sigma[:, None] ** 2)) * (dy.abs() <= radii[:, None])
    splats = (gy[:, :, None] * gx[:, None, :]).to(heatmap.dtype).flatten(1)  # [N,H*W]
    flat = heatmap.view(num_classes, height * width)
    flat.scatter_reduce_(0, labels[:, None].expand_as(splats), splats, reduce="amax")
    return heatmap


@dataclass
class CenterNetTargets:
    """Targets of a batch. ``heatmap`` Float[B,C,H,W]; ``ignore`` Bool[B,C,H,W] (cells left out of
    the negative focal term); ``indices`` Int64[M] flat ``b*H*W + y*W + x`` of each object's integer
    centre; ``wh`` Float[M,2] size in cells; ``offset`` Float[M,2] sub-cell centre offset in [0,1)."""

    heatmap: Tensor
    ignore: Tensor
    indices: Tensor
    wh: Tensor
    offset: Tensor

    @property
    def num_objects(self) -> int:
        return int(self.indices.numel())

    @property
    def num_peaks(self) -> int:
        """Heatmap cells equal to 1: the (class, cell) centres; same-class objects centred in one
        cell share a peak. The reference code divides its focal loss by this number."""
        return int(self.heatmap.eq(1).sum())


def _image_targets(target: dict, image_size, feat_size, num_classes: int, stride: int,
                   min_overlap: float, formula: str, ignore_crowd_regions: bool, radius_sizes: str):
    """Heatmap Float[C,H,W], ignore Bool[C,H,W], flat cell index Int64[M], wh, offset of one image."""
    height, width = feat_size
    boxes = target["boxes"].float()
    labels = target["labels"].long()
    device = boxes.device
    heatmap = torch.zeros(num_classes, height, width, device=device)
    ignore = torch.zeros(num_classes, height, width, dtype=torch.bool, device=device)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"image {target.get('image_id')}: labels must be in [0, {num_classes - 1}], "
                         f"got {labels.tolist()}")
    img_h, img_w = image_size
    clipped = torch.stack([boxes[:, 0].clamp(0, img_w), boxes[:, 1].clamp(0, img_h),
                           boxes[:, 2].clamp(0, img_w), boxes[:, 3].clamp(0, img_h)], 1) / stride
    skip = torch.zeros(len(boxes), dtype=torch.bool, device=device)
    for key in ("iscrowd", "difficult"):
        if target.get(key) is not None:
            skip |= target[key].to(device=device, dtype=torch.bool).reshape(-1)
    wh = clipped[:, 2:] - clipped[:, :2]
    has_area = (wh > 0).all(1)
    valid = ~skip & has_area
    if ignore_crowd_regions:
        for box, label in zip(clipped[skip & has_area], labels[skip & has_area]):
            x1, y1 = (int(math.floor(v)) for v in box[:2].tolist())
            x2, y2 = (int(math.ceil(v)) for v in box[2:].tolist())
            ignore[label, y1:y2, x1:x2] = True
    centers = (clipped[:, :2] + clipped[:, 2:]) / 2
    cells = centers.floor().long()
    # a heatmap smaller than image / stride (caller's choice) cannot hold every centre
    valid &= (cells[:, 0] < width) & (cells[:, 1] < height)
    centers, cells = centers[valid], cells[valid]
    sizes = wh[valid].ceil() if radius_sizes == "ceil" else wh[valid]
    radii = gaussian_radius(sizes[:, 1], sizes[:, 0], min_overlap, formula).floor().clamp(min=0).long()
    splat_gaussians(heatmap, cells, radii, labels[valid])
    index = cells[:, 1] * width + cells[:, 0]
    return heatmap, ignore, index, wh[valid], centers - cells.float()


def render_targets(targets: list[dict], image_sizes, feat_size: tuple[int, int], num_classes: int,
                   stride: int, *, min_overlap: float = 0.7, formula: str = "cornernet",
                   ignore_crowd_regions: bool = True, radius_sizes: str = "ceil") -> CenterNetTargets:
    """Render the CenterNet targets of a batch on a heatmap of ``feat_size`` (H, W) cells.

    Args:
        targets: per image, ``boxes`` Float[N,4] xyxy pixels, ``labels`` Int64[N], optional
            ``iscrowd`` / ``difficult`` Bool[N] (never positives).
        image_sizes: unpadded (H, W) pixels per image; boxes are clipped to them.
        radius_sizes: ``ceil`` or ``float`` box sizes for the radius (see ``RADIUS_SIZES``).
    """
    if radius_sizes not in RADIUS_SIZES:
        raise ValueError(f"unknown radius_sizes '{radius_sizes}'; expected one of {RADIUS_SIZES}")
    parts = [_image_targets(t, size, feat_size, num_classes, stride, min_overlap, formula,
                            ignore_crowd_regions, radius_sizes) for t, size in zip(targets, image_sizes)]
    cells = feat_size[0] * feat_size[1]
    return CenterNetTargets(
        heatmap=torch.stack([p[0] for p in parts]),
        ignore=torch.stack([p[1] for p in parts]),
        indices=torch.cat([p[2] + b * cells for b, p in enumerate(parts)]),
        wh=torch.cat([p[3] for p in parts]),
        offset=torch.cat([p[4] for p in parts]))


def decode_heatmap(heat: Tensor, wh: Tensor, offset: Tensor, stride: int, k: int = 100,
                   valid_sizes=None) -> tuple[Tensor, Tensor, Tensor]:
    """Peaks of a heatmap -> boxes: 3x3 max-pool peaks, top-``k`` over all classes and cells.

    Args:
        heat: Float[B,C,H,W] probabilities; wh: Float[B,2,H,W] size (cells); offset:
            Float[B,2,H,W] sub-cell centre offset.
        valid_sizes: optional (H, W) cells per image; peaks outside (padding) are dropped.
    Returns:
        scores Float[B,K], labels Int64[B,K], boxes Float[B,K,4] xyxy pixels, with
        ``box = ((x + off_x) -/+ w / 2, (y + off_y) -/+ h / 2) * stride``.
    """
    batch, num_classes, height, width = heat.shape
    is_peak = F.max_pool2d(heat, 3, stride=1, padding=1) == heat
    heat = heat * is_peak
    if valid_sizes is not None:
        for b, (h, w) in enumerate(valid_sizes):
            heat[b, :, h:, :] = 0
            heat[b, :, :, w:] = 0
    k = min(k, num_classes * height * width)
    scores, flat = heat.flatten(1).topk(k)
    labels = flat // (height * width)
    cell = flat % (height * width)
    ys, xs = (cell // width).float(), (cell % width).float()
    gather = lambda m: m.flatten(2).gather(2, cell[:, None].expand(-1, 2, -1))  # noqa: E731
    size, off = gather(wh), gather(offset)                                      # [B,2,K]
    cx, cy = xs + off[:, 0], ys + off[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1) * stride
    return scores, labels, boxes
