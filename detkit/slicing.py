"""Sliced (tiled) inference: run a detector on overlapping tiles of an image much larger than the
images it was trained on, so that small objects keep their training-scale size in pixels.

Legend: K boxes, T tiles; boxes are Float[K,4] xyxy in pixels, tiles Int64[T,4] xyxy.

Steps, for one HxWx3 image (:class:`SlicedInference`):

1. **Tiles** (:func:`tile_grid`): S x S windows whose neighbours overlap by at least
   ``ceil(overlap * S)`` pixels. Tiles are never padded: the last tile of a row / column is
   shifted inwards to end at the image border (it overlaps its neighbour more). A side shorter
   than S gets one tile spanning it, so an image no larger than S is one tile = plain inference.
2. **Prediction**: tiles go through ``predict_batch`` (the predictor's per-batch function, which
   applies the test pipeline, runs the model or an exported runtime and maps boxes back to the
   tile's pixels), ``batch_size`` tiles at a time; boxes are shifted by the tile's origin. With
   ``full_image`` the whole image is predicted once more, as the test pipeline sizes it, for
   objects larger than a tile.
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
4. **Merge**: all remaining boxes are merged class-wise by NMS or weighted boxes fusion with
   :func:`detkit.models.multiscale.merge_detections` (the test-time-augmentation merge). WBF runs
   with ``num_views=1``: most objects lie in one tile only and must not be down-weighted for it.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .models.multiscale import merge_detections

__all__ = ["SlicedInference", "tile_starts", "tile_grid", "cut_by_inner_edge", "drop_covered_cut_boxes"]

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


class SlicedInference:
    """Tile an image, predict the tiles in batches, map back, let cut boxes yield, merge.

    Args:
        slice_size: tile side S in pixels (of the input image, before the test pipeline).
        overlap: fraction of S by which neighbouring tiles overlap, in [0, 1).
        merge: ``"nms"`` or ``"wbf"`` (weighted boxes fusion), class-wise.
        full_image: also predict the whole image (through the test pipeline) and merge it in.
        iou_thr: IoU above which the merge joins two boxes of one class.
        edge_margin: pixels from an inner tile edge within which a box counts as cut.
        cover_thr: fraction of a cut box's area an uncut box must cover to replace it.
        cover_score_ratio: ... and the uncut box's score relative to the cut box's, at least.
        max_detections: keep at most this many merged boxes per image (None: all).
        progress_min_tiles: show a tqdm bar for images with at least this many tiles.
    """

    def __init__(self, *, slice_size: int, overlap: float = 0.2, merge: str = "nms",
                 full_image: bool = True, iou_thr: float = 0.5, edge_margin: float = 4.0,
                 cover_thr: float = 0.6, cover_score_ratio: float = 0.5, max_detections: int | None = None,
                 progress_min_tiles: int = 64):
        if int(slice_size) < 1:
            raise ValueError(f"slice_size must be >= 1 pixel, got {slice_size}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"slice_overlap must be in [0, 1), got {overlap}")
        if merge not in ("nms", "wbf"):
            raise ValueError(f"slice_merge must be 'nms' or 'wbf', got '{merge}'")
        self.slice_size, self.overlap, self.merge = int(slice_size), float(overlap), merge
        self.full_image = bool(full_image)
        self.iou_thr, self.edge_margin, self.cover_thr = float(iou_thr), float(edge_margin), float(cover_thr)
        self.cover_score_ratio = float(cover_score_ratio)
        self.max_detections = max_detections
        self.progress_min_tiles = int(progress_min_tiles)

    def __repr__(self) -> str:
        return (f"SlicedInference(slice_size={self.slice_size}, overlap={self.overlap}, "
                f"merge={self.merge!r}, full_image={self.full_image})")

    def __call__(self, image: np.ndarray, predict_batch: PredictBatch, batch_size: int) -> dict:
        """One HxWx3 image -> one result dict in the predictor's format (``boxes`` Float[K,4]
        xyxy image pixels, ``scores``, ``labels``, ``label_names``, ``image_size`` (H, W))."""
        h, w = image.shape[:2]
        tiles = tile_grid(h, w, self.slice_size, self.overlap)
        if len(tiles) == 1:   # the tile is the image: nothing to merge
            return predict_batch([image])[0]
        parts: list[tuple[dict, Tensor]] = []   # (result in image pixels, cut Bool[K])
        bar = tqdm(total=len(tiles), desc="tiles", unit="tile", leave=False,
                   disable=True if len(tiles) < self.progress_min_tiles else None)
        for start in range(0, len(tiles), batch_size):
            chunk = tiles[start:start + batch_size].tolist()
            results = predict_batch([np.ascontiguousarray(image[y0:y1, x0:x1]) for x0, y0, x1, y1 in chunk])
            for tile, result in zip(chunk, results):
                _check_boxes(result)
                boxes = result["boxes"] + result["boxes"].new_tensor([tile[0], tile[1]] * 2)
                parts.append((dict(result, boxes=boxes),
                              cut_by_inner_edge(boxes, tile, (h, w), self.edge_margin)))
            bar.update(len(chunk))
        bar.close()
        if self.full_image:
            result = _check_boxes(predict_batch([image])[0])
            parts.append((result, torch.zeros(len(result["boxes"]), dtype=torch.bool)))
        return self._merge(parts, (h, w))

    def _merge(self, parts: list[tuple[dict, Tensor]], image_size: tuple[int, int]) -> dict:
        boxes = torch.cat([p["boxes"].float() for p, _ in parts])
        scores = torch.cat([p["scores"].float() for p, _ in parts])
        labels = torch.cat([p["labels"].long() for p, _ in parts])
        keep = drop_covered_cut_boxes(boxes, scores, labels, torch.cat([c for _, c in parts]),
                                      self.cover_thr, self.cover_score_ratio)
        boxes, scores, labels = merge_detections(boxes[keep], scores[keep], labels[keep], merge=self.merge,
                                                 iou_thr=self.iou_thr, max_detections=self.max_detections)
        names = {int(label): name for p, _ in parts
                 for label, name in zip(p["labels"].tolist(), p.get("label_names", []))}
        return {"image_size": image_size, "boxes": boxes, "scores": scores, "labels": labels,
                "label_names": [names.get(int(i), str(int(i))) for i in labels]}


def _check_boxes(result: dict) -> dict:
    if "boxes" not in result:
        raise ValueError("sliced inference needs box predictions; this model returns "
                         f"{sorted(result)} (semantic segmentation is not sliced)")
    return result
