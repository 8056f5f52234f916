"""Polygon masks: rasterise polygons (YOLO-seg lines, COCO ``segmentation`` polygons) safely.

Polygons are Float[P,2] (x, y) in absolute pixel-edge coordinates (the box convention of
``detkit.data.base``: pixel column 3 spans x = 3..4); masks are UInt8[H,W] 0/1. pycocotools
rasterises them, so YOLO-seg txt and COCO json hold the same masks for the same polygons; what
it cannot take (coordinates near 1e9 crash the process, 2-point polygons raise TypeError,
non-finite values) is clipped or skipped here first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["polygon_masks", "clip_polygon", "clip_for_rasterising", "segmentation_mask"]


def polygon_masks(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """UInt8[N,H,W] 0/1 masks of N polygons Float[P,2] in absolute pixel-edge coordinates.

    Rasterised by pycocotools as the COCO reader's polygons are, so a dataset converted between
    COCO json and YOLO-seg txt gives the same masks, and a mask stays inside its box (a pixel is
    in when the polygon covers its centre; OpenCV's ``fillPoly`` also fills the pixels the
    outline touches, one more row and column on the right / bottom). Polygons reaching further
    than twice the image size beyond it are clipped there first: pycocotools walks every edge
    pixel by pixel and crashes the process on coordinates around 1e9 (polygons within that
    window, all real ones, are rasterised untouched, pixel for pixel as the COCO reader)."""
    from pycocotools import mask as mask_utils

    masks = np.zeros((len(polygons), height, width), np.uint8)
    for i, points in enumerate(polygons):
        points = np.asarray(points, np.float64).reshape(-1, 2)
        if len(points) < 3 or not np.isfinite(points).all():
            continue   # no area (pycocotools gives an empty mask for non-finite values too)
        inside = clip_for_rasterising(points, height, width)
        if len(inside) < 3:
            continue
        rles = mask_utils.frPyObjects([inside.reshape(-1).tolist()], height, width)
        masks[i] = mask_utils.decode(mask_utils.merge(rles))
    return masks


def clip_for_rasterising(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float[P,2] -> the part within twice the image size around the image (see polygon_masks)."""
    return clip_polygon(np.asarray(points, np.float64).reshape(-1, 2), width, height,
                        margin=2.0 * max(height, width))


def clip_polygon(points: np.ndarray, width: float, height: float, *, margin: float = 0.0) -> np.ndarray:
    """Float[P,2] polygon -> the part inside [-margin, width + margin] x [-margin, height + margin]
    (Sutherland-Hodgman: exact for any simple polygon against this convex window; edges along
    the window's border lie outside the image when ``margin`` > 0)."""
    bounds = ((0, -margin, 1.0), (0, width + margin, -1.0), (1, -margin, 1.0), (1, height + margin, -1.0))
    for axis, limit, sign in bounds:
        if len(points) == 0:
            break
        following = np.roll(points, -1, axis=0)
        inside = sign * (points[:, axis] - limit) >= 0
        inside_next = np.roll(inside, -1)
        out: list[np.ndarray] = []
        for p, q, p_in, q_in in zip(points, following, inside, inside_next):
            if p_in:
                out.append(p)
            if p_in != q_in:   # the edge crosses the border: add the crossing point
                t = (limit - p[axis]) / (q[axis] - p[axis])
                out.append(p + t * (q - p))
        points = np.array(out, np.float64).reshape(-1, 2)
    return points


def segmentation_mask(coco, ann: dict, height: int, width: int) -> np.ndarray:
    """UInt8[H,W] mask of a COCO annotation: its polygons through :func:`polygon_masks` (a
    polygon of an odd length loses its last number, as pycocotools reads it), RLE as
    pycocotools' ``annToMask``. Raises ValueError / TypeError for values that are not numbers."""
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list) and all(isinstance(p, (list, tuple)) for p in segmentation):
        polygons = [np.asarray(p, np.float64)[: len(p) // 2 * 2].reshape(-1, 2) for p in segmentation]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        return polygon_masks(polygons, height, width).max(axis=0)
    return coco.annToMask(ann)
