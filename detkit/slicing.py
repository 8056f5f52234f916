"""Sliced (tiled) inference: run a detector on overlapping tiles of an image much larger than the
images it was trained on, so that small objects keep their training-scale size in pixels.

Legend: K boxes, T tiles; boxes are Float[K,4] xyxy in pixels, tiles Int64[T,4] xyxy; masks
Bool[K,H,W] in the pixels of the image they belong to.

Steps, for a list of HxWx3 images (:meth:`SlicedInference.predict_images`):

1. **Tiles** (:func:`tile_grid`): S x S windows whose neighbours overlap by at least
   ``ceil(overlap * S)`` pixels. Tiles are never padded: the last tile of a row / column is
   shifted inwards to end at the image border (it overlaps its neighbour more). A side shorter
   than S gets one tile spanning it, so an image no larger than S is one tile = plain inference.
2. **Prediction**: the tiles of *all* images go through ``predict_batch`` (the predictor's
   per-batch function, which applies the test pipeline, runs the model or an exported runtime
   and maps boxes back to the tile's pixels), ``batch_size`` tiles at a time whatever image they
   come from; boxes (and Mask R-CNN masks) are shifted by the tile's origin. With ``full_image``
   each image is then predicted once more as a whole (these views batched together too), for
   objects larger than a tile: as the test pipeline sizes it, or first shrunk to a long side of
   ``full_image_size`` (SAHI's global view at the model's input size; without it a test
   pipeline that does not resize makes this a second full-resolution pass).
3. **Cut boxes yield** (:func:`drop_covered_cut_boxes`): a box within ``edge_margin`` pixels of an
   *inner* tile edge (one that is not the image border) may show only the part of an object that
   lies inside that tile. It is dropped when a box of the same class that touches no inner edge
   (from a neighbouring tile, or the full-image pass) covers at least ``cover_thr`` of its area
   and scores at least ``cover_score_ratio`` times as high: that box saw the whole object (the
   score condition keeps a confident part from yielding to a low-score background peak that
   happens to contain it). A cut box nobody covers (an object larger than the overlap, missed by
   the other tile) is kept, so nothing found is lost. Why not NMS alone: half an
   object has IoU ~0.5 with the whole one, so NMS keeps both unless its threshold is so low
   that it also merges neighbouring objects. Every object no larger than the overlap lies wholly
   inside some tile (tile starts are at most ``S - overlap`` apart), so for those objects a whole
   view exists.
4. **Merge** (:func:`merge_tile_detections`): the remaining boxes are merged class-wise by NMS or
   weighted boxes fusion (the clustering of :func:`detkit.models.multiscale.wbf_clusters`). A
   fused box scores its best member's score by default (``wbf_score="max"``), as NMS and SAHI do:
   the members are views of one object from overlapping tiles, often a whole view and a cut
   part, and averaging them (0.9 and 0.3 -> 0.6) would make an object's score depend on where the
   tile edges fall. Each merged detection keeps the mask of the detection it comes from (NMS) or
   of its best member (WBF), pasted into the image's pixels, so a mask model's result has
   ``masks`` Bool[K,H,W] whether the image is one tile or many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms
from tqdm import tqdm

from .models.multiscale import wbf_clusters

__all__ = ["SlicedInference", "tile_starts", "tile_grid", "cut_by_inner_edge", "drop_covered_cut_boxes",
           "merge_tile_detections", "mask_pieces", "paste_mask_pieces"]

PredictBatch = Callable[[list[np.ndarray]], list[dict]]


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels along a side of ``length`` pixels, neighbours
    overlapping by at least ``ceil(overlap * tile)``; the last one ends at ``length``."""
    if length <= tile:
        return [0]
    stride = max(1, tile - math.ceil(overlap * tile))
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def tile_grid(height: int, width: int, tile_size: int, overlap: float) -> Tensor:
    """Int64[T,4] xyxy tiles covering a ``height`` x ``width`` image, row by row; each tile is
    ``min(tile_size, width)`` x ``min(tile_size, height)`` pixels and lies inside the image."""
    tw, th = min(tile_size, width), min(tile_size, height)
    tiles = [(x, y, x + tw, y + th) for y in tile_starts(height, tile_size, overlap)
             for x in tile_starts(width, tile_size, overlap)]
    return torch.tensor(tiles, dtype=torch.int64).reshape(-1, 4)


def cut_by_inner_edge(boxes: Tensor, tile: Sequence[int], image_size: tuple[int, int],
                      margin: float) -> Tensor:
    """Bool[K]: which Float[K,4] boxes (image pixels) of ``tile`` (x0, y0, x1, y1) come within
    ``margin`` pixels of one of its edges that is inside the image ``(H, W)``."""
    x0, y0, x1, y1 = (int(v) for v in tile)
    h, w = image_size
    cut = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + margin
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + margin
    if x1 < w:
        cut |= boxes[:, 2] >= x1 - margin
    if y1 < h:
        cut |= boxes[:, 3] >= y1 - margin
    return cut


def drop_covered_cut_boxes(boxes: Tensor, scores: Tensor, labels: Tensor, cut: Tensor, cover_thr: float,
                           score_ratio: float = 0.5) -> Tensor:
    """Bool[K] keep mask: False for each cut box (``cut`` Bool[K]) of which an uncut box of the
    same label covers at least ``cover_thr`` of the area (intersection / cut box area) with a
    score at least ``score_ratio`` times the cut box's."""
    keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    cut_idx, whole_idx = torch.nonzero(cut).flatten(), torch.nonzero(~cut).flatten()
    if len(cut_idx) == 0 or len(whole_idx) == 0:
        return keep
    part, whole = boxes[cut_idx], boxes[whole_idx]
    lt = torch.maximum(part[:, None, :2], whole[None, :, :2])
    rb = torch.minimum(part[:, None, 2:], whole[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)                           # [cut, whole]
    area = (part[:, 2:] - part[:, :2]).clamp(min=0).prod(dim=1).clamp(min=1e-6)
    same = labels[cut_idx][:, None] == labels[whole_idx][None, :]
    confident = scores[whole_idx][None, :] >= score_ratio * scores[cut_idx][:, None]
    covered = ((inter / area[:, None] >= cover_thr) & same & confident).any(dim=1)
    keep[cut_idx[covered]] = False
    return keep


def merge_tile_detections(boxes: Tensor, scores: Tensor, labels: Tensor, *, merge: str, iou_thr: float,
                          wbf_score: str = "max", max_detections: int | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-wise merge of pooled Float[K,4] xyxy tile detections: ``"nms"`` keeps the best of
    overlapping boxes, ``"wbf"`` fuses them (score: the members' ``"max"`` or ``"mean"``).

    Returns boxes Float[M,4], scores Float[M], labels Int64[M], best first, at most
    ``max_detections`` (None: all), and ``source`` Int64[M]: the input detection each output is
    (NMS) or whose score is highest among its members (WBF), e.g. to keep its mask.
    """
    if merge == "nms":
        source = batched_nms(boxes, scores, labels, iou_thr)[:max_detections]
        return boxes[source], scores[source], labels[source], source
    if merge != "wbf":
        raise ValueError(f"merge must be 'nms' or 'wbf', got '{merge}'")
    fused, fused_labels, members = wbf_clusters(boxes, scores, labels, iou_thr=iou_thr)
    if not members:
        return boxes.new_zeros(0, 4), scores.new_zeros(0), labels.new_zeros(0), labels.new_zeros(0)
    best = torch.tensor([m[0] for m in members], dtype=torch.int64, device=boxes.device)
    if wbf_score == "max":       # members are listed highest score first
        fused_scores = scores[best]
    elif wbf_score == "mean":
        fused_scores = torch.stack([scores[m].mean() for m in members])
    else:
        raise ValueError(f"wbf_score must be 'max' or 'mean', got '{wbf_score}'")
    order = torch.argsort(fused_scores, descending=True, stable=True)[:max_detections]
    return fused[order], fused_scores[order], fused_labels[order], best[order]


@dataclass
class _MaskPiece:
    """One instance mask cropped to its pixels' extent; ``region`` (x0, y0, x1, y1) is where the
    crop goes in image pixels (not integers for a shrunken full-image view)."""
    region: tuple[float, float, float, float]
    crop: Tensor                                       # Bool[h, w]


def mask_pieces(masks: Tensor, origin: tuple[float, float], scale: tuple[float, float]
                ) -> list[_MaskPiece | None]:
    """Bool[K,h,w] masks of a view -> one piece per mask (None for an empty one), kept small:
    only the extent of its pixels, so thousands of tile detections do not each hold an image."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)                    # [K,h], [K,w]
    h, w = masks.shape[-2:]
    top, left = rows.int().argmax(dim=1), cols.int().argmax(dim=1)
    bottom, right = h - rows.flip(1).int().argmax(dim=1), w - cols.flip(1).int().argmax(dim=1)
    (ox, oy), (sx, sy) = origin, scale
    pieces: list[_MaskPiece | None] = []
    for k, (t, b, lft, r) in enumerate(zip(top.tolist(), bottom.tolist(), left.tolist(), right.tolist())):
        if not bool(rows[k].any()):
            pieces.append(None)
            continue
        pieces.append(_MaskPiece((ox + lft * sx, oy + t * sy, ox + r * sx, oy + b * sy),
                                 masks[k, t:b, lft:r].clone()))
    return pieces


def paste_mask_pieces(pieces: Sequence[_MaskPiece | None], image_size: tuple[int, int]) -> Tensor:
    """Bool[K,H,W]: each piece at its region (nearest-neighbour resized when its view was scaled)."""
    h, w = image_size
    out = torch.zeros(len(pieces), h, w, dtype=torch.bool)
    for k, piece in enumerate(pieces):
        if piece is None:
            continue
        x0, y0, x1, y1 = (round(v) for v in piece.region)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        crop = piece.crop
        if tuple(crop.shape) != (y1 - y0, x1 - x0):
            crop = F.interpolate(crop[None, None].float(), size=(y1 - y0, x1 - x0), mode="nearest")[0, 0]
            crop = crop > 0.5
        out[k, y0:y1, x0:x1] = crop
    return out


@dataclass
class _View:
    """What one forward-pass input is: a tile of image ``index`` (``tile`` xyxy), the whole of a
    one-tile image (``whole``: its result is returned as is), or a full-image view (``tile`` None)
    shrunk by ``scale`` (image pixels per view pixel)."""
    index: int
    tile: tuple[int, int, int, int] | None
    whole: bool = False
    scale: tuple[float, float] = (1.0, 1.0)


@dataclass
class _Part:
    """One view's detections in image pixels: boxes, scores, labels, cut Bool[K], mask pieces."""
    result: dict
    cut: Tensor
    masks: list[_MaskPiece | None] | None


class SlicedInference:
    """Tile images, predict the tiles of all of them in batches, map back, let cut boxes yield, merge.

    Args:
        slice_size: tile side S in pixels (of the input image, before the test pipeline).
        overlap: fraction of S by which neighbouring tiles overlap, in [0, 1).
        merge: ``"nms"`` or ``"wbf"`` (weighted boxes fusion), class-wise.
        full_image: also predict each whole image (through the test pipeline) and merge it in.
        full_image_size: shrink the whole image to this long side (pixels) before that pass, the
            model's own input size (e.g. its training crop); None: the image as the test pipeline
            sizes it, which is full resolution when the pipeline does not resize. Never enlarges.
        wbf_score: a WBF cluster's score, its members' ``"max"`` (default, see the module doc) or
            ``"mean"``.
        iou_thr: IoU above which the merge joins two boxes of one class.
        edge_margin: pixels from an inner tile edge within which a box counts as cut.
        cover_thr: fraction of a cut box's area an uncut box must cover to replace it.
        cover_score_ratio: ... and the uncut box's score relative to the cut box's, at least.
        max_detections: keep at most this many merged boxes per image (None: all).
        progress_min_tiles: show a tqdm bar for calls with at least this many tiles.
    """

    def __init__(self, *, slice_size: int, overlap: float = 0.2, merge: str = "nms",
                 full_image: bool = True, full_image_size: int | None = None, wbf_score: str = "max",
                 iou_thr: float = 0.5, edge_margin: float = 4.0, cover_thr: float = 0.6,
                 cover_score_ratio: float = 0.5, max_detections: int | None = None,
                 progress_min_tiles: int = 64):
        if int(slice_size) < 1:
            raise ValueError(f"slice_size must be >= 1 pixel, got {slice_size}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"slice_overlap must be in [0, 1), got {overlap}")
        if merge not in ("nms", "wbf"):
            raise ValueError(f"slice_merge must be 'nms' or 'wbf', got '{merge}'")
        if full_image_size is not None and int(full_image_size) < 1:
            raise ValueError(f"full_image_size must be >= 1 pixel or None, got {full_image_size}")
        if wbf_score not in ("max", "mean"):
            raise ValueError(f"wbf_score must be 'max' or 'mean', got '{wbf_score}'")
        self.slice_size, self.overlap, self.merge = int(slice_size), float(overlap), merge
        self.full_image = bool(full_image)
        self.full_image_size = None if full_image_size is None else int(full_image_size)
        self.wbf_score = wbf_score
        self.iou_thr, self.edge_margin, self.cover_thr = float(iou_thr), float(edge_margin), float(cover_thr)
        self.cover_score_ratio = float(cover_score_ratio)
        self.max_detections = max_detections
        self.progress_min_tiles = int(progress_min_tiles)

    def __repr__(self) -> str:
        return (f"SlicedInference(slice_size={self.slice_size}, overlap={self.overlap}, "
                f"merge={self.merge!r}, full_image={self.full_image}, "
                f"full_image_size={self.full_image_size})")

    def __call__(self, image: np.ndarray, predict_batch: PredictBatch, batch_size: int) -> dict:
        """One HxWx3 image -> one result dict (see :meth:`predict_images`)."""
        return self.predict_images([image], predict_batch, batch_size)[0]

    def predict_images(self, images: Sequence[np.ndarray], predict_batch: PredictBatch,
                       batch_size: int) -> list[dict]:
        """HxWx3 images -> one result dict each in the predictor's format (``boxes`` Float[K,4]
        xyxy image pixels, ``scores``, ``labels``, ``label_names``, ``image_size`` (H, W), and
        ``masks`` Bool[K,H,W] for a mask model). Tiles of different images share forward passes
        of ``batch_size``; then the full-image views (if any), ``batch_size`` at a time."""
        tile_views, full_views = self._views(images)
        parts: list[list[_Part]] = [[] for _ in images]
        plain: dict[int, dict] = {}
        bar = tqdm(total=len(tile_views), desc="tiles", unit="tile", leave=False,
                   disable=True if len(tile_views) < self.progress_min_tiles else None)
        for views in (tile_views, full_views):
            for start in range(0, len(views), batch_size):
                chunk = views[start:start + batch_size]
                results = predict_batch([self._view_array(images[v.index], v) for v in chunk])
                for view, result in zip(chunk, results):
                    image_size = images[view.index].shape[:2]
                    if view.whole:
                        plain[view.index] = result
                    else:
                        parts[view.index].append(self._to_image_part(result, view, image_size))
                bar.update(len(chunk) if views is tile_views else 0)
        bar.close()
        return [plain[i] if i in plain else self._merge(parts[i], tuple(images[i].shape[:2]))
                for i in range(len(images))]

    def _views(self, images: Sequence[np.ndarray]) -> tuple[list[_View], list[_View]]:
        tiles, fulls = [], []
        for index, image in enumerate(images):
            h, w = image.shape[:2]
            grid = tile_grid(h, w, self.slice_size, self.overlap).tolist()
            if len(grid) == 1:   # the tile is the image: nothing to merge
                tiles.append(_View(index, tuple(grid[0]), whole=True))
                continue
            tiles.extend(_View(index, tuple(t)) for t in grid)
            if self.full_image:
                factor = 1.0 if self.full_image_size is None else min(1.0, self.full_image_size / max(h, w))
                nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
                fulls.append(_View(index, None, scale=(w / nw, h / nh)))
        return tiles, fulls

    @staticmethod
    def _view_array(image: np.ndarray, view: _View) -> np.ndarray:
        if view.tile is not None:
            x0, y0, x1, y1 = view.tile
            return np.ascontiguousarray(image[y0:y1, x0:x1])
        if view.scale == (1.0, 1.0):
            return image
        h, w = image.shape[:2]
        size = (round(w / view.scale[0]), round(h / view.scale[1]))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)   # area: no aliasing when shrinking

    def _to_image_part(self, result: dict, view: _View, image_size: tuple[int, int]) -> _Part:
        _check_boxes(result)
        boxes = result["boxes"].float()
        if view.tile is not None:
            origin = (float(view.tile[0]), float(view.tile[1]))
            boxes = boxes + boxes.new_tensor(origin * 2)
            cut = cut_by_inner_edge(boxes, view.tile, image_size, self.edge_margin)
        else:
            origin = (0.0, 0.0)
            boxes = boxes * boxes.new_tensor(view.scale * 2)
            cut = torch.zeros(len(boxes), dtype=torch.bool)
        masks = result.get("masks")
        pieces = None if masks is None else mask_pieces(masks.cpu(), origin, view.scale)
        return _Part(dict(result, boxes=boxes), cut.cpu(), pieces)

    def _merge(self, parts: list[_Part], image_size: tuple[int, int]) -> dict:
        boxes = torch.cat([p.result["boxes"].float() for p in parts])
        scores = torch.cat([p.result["scores"].float() for p in parts])
        labels = torch.cat([p.result["labels"].long() for p in parts])
        keep = drop_covered_cut_boxes(boxes, scores, labels, torch.cat([p.cut for p in parts]),
                                      self.cover_thr, self.cover_score_ratio)
        boxes, scores, labels, source = merge_tile_detections(
            boxes[keep], scores[keep], labels[keep], merge=self.merge, iou_thr=self.iou_thr,
            wbf_score=self.wbf_score, max_detections=self.max_detections)
        names = {int(label): name for p in parts
                 for label, name in zip(p.result["labels"].tolist(), p.result.get("label_names", []))}
        merged = {"image_size": image_size, "boxes": boxes, "scores": scores, "labels": labels,
                  "label_names": [names.get(int(i), str(int(i))) for i in labels]}
        if any(p.masks is not None for p in parts):
            pieces = [piece for p in parts for piece in (p.masks or [None] * len(p.cut))]
            kept = [pieces[i] for i in torch.nonzero(keep).flatten().tolist()]
            merged["masks"] = paste_mask_pieces([kept[i] for i in source.tolist()], image_size)
        return merged


def _check_boxes(result: dict) -> dict:
    if "boxes" not in result:
        raise ValueError("sliced inference needs box predictions; this model returns "
                         f"{sorted(result)} (semantic segmentation is not sliced)")
    return result
