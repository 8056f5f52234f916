"""Mosaic: a training-set wrapper that tiles four images into one (YOLOv4-style), then runs the pipeline.

Config (a split's ``dataset`` node)::

    dataset:
      type: Mosaic
      dataset: {type: CocoDetection, img_dir: train, ann_file: annotations/instances_train.json}
      size: 416            # output side (pixels); int or [h, w]
      prob: 1.0            # probability of a mosaic; otherwise the plain image goes on
      until_epoch: 90      # optional: plain images from this training epoch on (close_mosaic)
    pipeline: [...]        # runs on the mosaic (or the plain image): keep a Letterbox in it

How a mosaic is made: a centre (xc, yc) is drawn uniformly in ``center_range`` x the output size;
the sample's image and three random others are resized to fit ``size`` (aspect ratio kept) and
put in the four quadrants around the centre, each touching the centre with one corner
(top-left, top-right, bottom-left, bottom-right), and cropped to the canvas. Boxes move with
their image, are clipped to their tile and dropped when less than ``min_visible`` of their area
remains (crowd / difficult regions are kept whatever remains, since they only mask the loss).
Semantic masks are tiled too when every tile has one (255 = ignore where no tile is).

The result is a raw dict (``detkit.data.base``) of a ``size`` image whose ``orig_size`` is
``size`` and ``scale`` / ``offset`` identity: a mosaic has no single original image, so use it
for training splits only. Random choices come from ``set_seed`` (the loader seeds every sample).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ..registry import DATASETS
from .wrappers import RawSampleWrapper

__all__ = ["Mosaic"]

_PER_BOX = ("labels", "iscrowd", "difficult")


@DATASETS.register()
class Mosaic(RawSampleWrapper):
    """Four-image mosaic around ``dataset`` (any detkit dataset with ``get_raw``); see module doc.

    Args:
        dataset: the wrapped dataset, built without transforms.
        size: output (h, w) or side.
        prob: mosaic probability per sample.
        center_range: the centre is drawn in [lo, hi] x size along each axis.
        min_visible: keep a cropped box if at least this fraction of its area is in the tile.
        pad_value: grey level of canvas pixels no tile covers.
        until_epoch: the first training epoch without mosaics (None: mosaics to the end); the
            loader tells the dataset the epoch (``set_augment_epoch``).
        transforms: the split's pipeline, applied to the mosaic (or plain) raw sample.
    """

    ARGUMENTS = ("size", "prob", "center_range", "min_visible", "pad_value", "until_epoch")
    REQUIRED = ("size",)

    def __init__(self, dataset, *, size: int | Sequence[int], prob: float = 1.0,
                 center_range: Sequence[float] = (0.25, 0.75), min_visible: float = 0.3,
                 pad_value: int = 114, until_epoch: int | None = None, transforms=None):
        if not hasattr(dataset, "get_raw"):
            raise ValueError(f"Mosaic: the wrapped dataset ({type(dataset).__name__}) has no get_raw()")
        if len(dataset) == 0:
            raise ValueError("Mosaic: the wrapped dataset is empty")
        if getattr(dataset, "instance_masks", False):
            raise ValueError("Mosaic does not tile instance masks; train Mask R-CNN without Mosaic "
                             "(or set instance_masks: false for a box-only model)")
        self.size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 2:
            raise ValueError(f"Mosaic: size must be a positive int or [h, w], got {size!r}")
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"Mosaic: prob must be in [0, 1], got {prob}")
        lo, hi = (float(v) for v in center_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"Mosaic: center_range must satisfy 0 <= lo <= hi <= 1, got {center_range}")
        super().__init__(dataset, transforms=transforms)
        self.prob, self.center_range = float(prob), (lo, hi)
        self.min_visible, self.pad_value = float(min_visible), int(pad_value)
        if until_epoch is not None and (isinstance(until_epoch, bool) or int(until_epoch) != until_epoch
                                        or until_epoch < 0):
            raise ValueError(f"Mosaic: until_epoch must be an epoch number >= 0, got {until_epoch!r}")
        self.until_epoch = None if until_epoch is None else int(until_epoch)
        self.rng = np.random.default_rng(0)
        self.epoch = 0

    # ------------------------------------------------------------ dataset protocol
    def set_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(int(seed))

    def set_augment_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def get_raw(self, index: int) -> dict:
        """A mosaic raw dict (with probability ``prob``) or the wrapped dataset's raw sample."""
        closed = self.until_epoch is not None and self.epoch >= self.until_epoch
        if closed or self.rng.random() >= self.prob:
            return self._inner_raw(index)
        others = self.rng.integers(0, len(self.dataset), size=3)
        return self.combine([self._inner_raw(index)] + [self._inner_raw(int(i)) for i in others])

    def aspect_ratios(self) -> list[float]:
        h, w = self.size
        return [w / h] * len(self) if self.prob >= 1.0 else self.dataset.aspect_ratios()

    # ------------------------------------------------------------ the mosaic itself
    def combine(self, raws: list[dict]) -> dict:
        """Tile four raw dicts (original pixels) into one ``size`` raw dict."""
        out_h, out_w = self.size
        lo, hi = self.center_range
        xc = int(round(self.rng.uniform(lo, hi) * out_w))
        yc = int(round(self.rng.uniform(lo, hi) * out_h))
        image = np.full((out_h, out_w, 3), self.pad_value, np.uint8)
        with_masks = all(r.get("sem_seg") is not None for r in raws)
        mask = np.full((out_h, out_w), 255, np.uint8) if with_masks else None
        with_difficult = any(r.get("difficult") is not None for r in raws)
        parts: dict[str, list] = {"boxes": [], "labels": [], "iscrowd": [], "difficult": []}
        for corner, raw in enumerate(raws):
            tile, scale = _fit(raw["image"], out_h, out_w, cv2.INTER_LINEAR)
            h, w = tile.shape[:2]
            (x1, y1, x2, y2), (sx1, sy1) = _placement(corner, xc, yc, h, w, out_h, out_w)
            image[y1:y2, x1:x2] = tile[sy1:sy1 + y2 - y1, sx1:sx1 + x2 - x1]
            if mask is not None:
                tile_mask, _ = _fit(raw["sem_seg"], out_h, out_w, cv2.INTER_NEAREST)
                mask[y1:y2, x1:x2] = tile_mask[sy1:sy1 + y2 - y1, sx1:sx1 + x2 - x1]
            boxes, keep = self._move_boxes(raw, scale, (x1 - sx1, y1 - sy1), (x1, y1, x2, y2))
            n = len(raw["boxes"])
            parts["boxes"].append(boxes[keep])
            parts["labels"].append(np.asarray(raw["labels"], np.int64).reshape(-1)[keep])
            parts["iscrowd"].append(_flags(raw, "iscrowd", n)[keep])
            parts["difficult"].append(_flags(raw, "difficult", n)[keep])
        result = {"image": image, "boxes": np.concatenate(parts["boxes"]).reshape(-1, 4).astype(np.float32),
                  "labels": np.concatenate(parts["labels"]), "iscrowd": np.concatenate(parts["iscrowd"]),
                  "image_id": raws[0]["image_id"], "orig_size": (out_h, out_w),
                  "scale": (1.0, 1.0), "offset": (0.0, 0.0)}
        if with_difficult:
            result["difficult"] = np.concatenate(parts["difficult"])
        if mask is not None:
            result["sem_seg"] = mask
        return result

    def _move_boxes(self, raw: dict, scale: tuple[float, float], shift: tuple[int, int],
                    region: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Boxes Float[N,4] scaled by (sx, sy), shifted, clipped to ``region``; Bool[N] which to keep."""
        boxes = np.asarray(raw["boxes"], np.float64).reshape(-1, 4) * np.array([*scale, *scale])
        boxes += np.array([shift[0], shift[1], shift[0], shift[1]], np.float64)
        full = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        x1, y1, x2, y2 = region
        clipped = np.clip(boxes, [x1, y1, x1, y1], [x2, y2, x2, y2])
        wh = clipped[:, 2:] - clipped[:, :2]
        visible = wh[:, 0] * wh[:, 1]
        n = len(boxes)
        ignore_region = _flags(raw, "iscrowd", n) | _flags(raw, "difficult", n)
        enough = visible >= self.min_visible * np.maximum(full, 1e-9)
        keep = (wh > 0).all(axis=1) & (enough | ignore_region)
        return clipped.astype(np.float32), keep


def _fit(image: np.ndarray, out_h: int, out_w: int, interpolation: int) -> tuple[np.ndarray, tuple]:
    """Resize H x W (x 3) to fit in out_h x out_w, aspect ratio kept; returns it and the per-axis
    factors (sx, sy) the pixels got (after rounding), which the boxes then use."""
    h, w = image.shape[:2]
    scale = min(out_h / h, out_w / w)
    nh, nw = max(1, min(out_h, int(round(h * scale)))), max(1, min(out_w, int(round(w * scale))))
    if (nh, nw) == (h, w):
        return image, (1.0, 1.0)
    return cv2.resize(image, (nw, nh), interpolation=interpolation), (nw / w, nh / h)


def _placement(corner: int, xc: int, yc: int, h: int, w: int, out_h: int,
               out_w: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Canvas region (x1, y1, x2, y2) of a tile h x w touching (xc, yc) at ``corner`` (0 TL, 1 TR,
    2 BL, 3 BR of the canvas), and the tile pixel (sx1, sy1) that lands at (x1, y1)."""
    left, top = corner in (0, 2), corner in (0, 1)
    x1, x2 = (max(xc - w, 0), xc) if left else (xc, min(xc + w, out_w))
    y1, y2 = (max(yc - h, 0), yc) if top else (yc, min(yc + h, out_h))
    sx1 = w - (x2 - x1) if left else 0
    sy1 = h - (y2 - y1) if top else 0
    return (x1, y1, x2, y2), (sx1, sy1)


def _flags(raw: dict, key: str, n: int) -> np.ndarray:
    value = raw.get(key)
    return np.zeros(n, bool) if value is None else np.asarray(value, bool).reshape(-1)
