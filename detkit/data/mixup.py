"""MixUp: a training-set wrapper that blends each image with a random other one (DEIM's Dense O2O).

Config (a split's ``dataset`` node)::

    dataset:
      type: MixUp
      dataset: {type: Mosaic, size: 640, dataset: {type: CocoDetection, ...}}   # any dataset with get_raw
      prob: 0.5            # probability of a blend; otherwise the plain sample goes on
      ratio: [0.45, 0.55]  # the first image's weight, drawn uniformly in this range (DEIM's)
      from_epoch: 4        # optional: blends start at this training epoch (DEIM: 4)
      until_epoch: 64      # optional: and stop at this one (DEIM: 64)
    pipeline: [...]        # runs on the blended raw sample

The other image is resized to the first one's size (per axis; its boxes scale with it), the pixels
are mixed as ``r * first + (1 - r) * other`` and the boxes of both are kept: twice the targets per
image, which is what DEIM's dense one-to-one matching feeds on. The result keeps the first image's
``image_id`` / ``orig_size`` / ``scale`` / ``offset``: use it for training splits only. Random
choices come from ``set_seed`` (the loader seeds every sample), the epoch from
``set_augment_epoch``.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ..errors import DatasetError
from ..registry import DATASETS
from .wrappers import RawSampleWrapper

__all__ = ["MixUp"]

_STREAM = 0x4D495855   # "MIXU": keeps MixUp's draws independent of the wrapped dataset's


@DATASETS.register()
class MixUp(RawSampleWrapper):
    """Blend of two samples of ``dataset`` (any detkit dataset or wrapper with ``get_raw``)."""

    ARGUMENTS = ("prob", "ratio", "from_epoch", "until_epoch")

    def __init__(self, dataset, *, prob: float = 0.5, ratio: Sequence[float] = (0.45, 0.55),
                 from_epoch: int | None = None, until_epoch: int | None = None, transforms=None):
        if not hasattr(dataset, "get_raw"):
            raise ValueError(f"MixUp: the wrapped dataset ({type(dataset).__name__}) has no get_raw()")
        if len(dataset) == 0:
            raise ValueError("MixUp: the wrapped dataset is empty")
        if getattr(dataset, "instance_masks", False):
            raise ValueError("MixUp does not blend instance masks; train Mask R-CNN without MixUp")
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"MixUp: prob must be in [0, 1], got {prob}")
        lo, hi = (float(v) for v in ratio)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"MixUp: ratio must satisfy 0 <= lo <= hi <= 1, got {ratio}")
        for name, value in (("from_epoch", from_epoch), ("until_epoch", until_epoch)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
                raise ValueError(f"MixUp: {name} must be an epoch number >= 0, got {value!r}")
        super().__init__(dataset, transforms=transforms)
        self.prob, self.ratio = float(prob), (lo, hi)
        self.from_epoch = None if from_epoch is None else int(from_epoch)
        self.until_epoch = None if until_epoch is None else int(until_epoch)
        self.rng = np.random.default_rng(0)
        self.epoch = 0

    def set_seed(self, seed: int) -> None:
        # a stream of its own: a wrapped Mosaic gets the same per-sample seed
        self.rng = np.random.default_rng((int(seed), _STREAM))

    def set_augment_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def active(self) -> bool:
        """Whether this training epoch blends (``from_epoch`` <= epoch < ``until_epoch``)."""
        return ((self.from_epoch is None or self.epoch >= self.from_epoch)
                and (self.until_epoch is None or self.epoch < self.until_epoch))

    def get_raw(self, index: int) -> dict:
        """A blended raw dict (with probability ``prob`` in active epochs) or the plain sample."""
        if not self.active() or self.rng.random() >= self.prob:
            return self._inner_raw(index)
        other = int(self.rng.integers(0, len(self.dataset)))
        ratio = float(self.rng.uniform(*self.ratio))
        return self.combine(self._inner_raw(index), self._inner_raw(other), ratio)

    @staticmethod
    def combine(first: dict, other: dict, ratio: float) -> dict:
        """``ratio * first + (1 - ratio) * other`` (other resized to first's size), boxes of both."""
        if first.get("sem_seg") is not None or first.get("masks") is not None:
            raise DatasetError("MixUp blends boxes only: the dataset has segmentation masks")
        h, w = first["image"].shape[:2]
        oh, ow = other["image"].shape[:2]
        image = other["image"] if (oh, ow) == (h, w) else cv2.resize(other["image"], (w, h),
                                                                     interpolation=cv2.INTER_LINEAR)
        blended = first["image"].astype(np.float32) * ratio + image.astype(np.float32) * (1.0 - ratio)
        other_boxes = np.asarray(other["boxes"], np.float32).reshape(-1, 4) * np.array(
            [w / ow, h / oh, w / ow, h / oh], np.float32)
        first_boxes = np.asarray(first["boxes"], np.float32).reshape(-1, 4)
        result = dict(first, image=np.clip(np.rint(blended), 0, 255).astype(np.uint8),
                      boxes=np.concatenate([first_boxes, other_boxes]))
        for key in ("labels", "iscrowd", "difficult"):
            if first.get(key) is None and other.get(key) is None:
                continue
            parts = [np.asarray(r[key]).reshape(-1) if r.get(key) is not None
                     else np.zeros(len(np.asarray(r["boxes"]).reshape(-1, 4)), bool) for r in (first, other)]
            result[key] = np.concatenate(parts).astype(np.int64 if key == "labels" else bool)
        return result

    def aspect_ratios(self) -> list[float]:
        return self.dataset.aspect_ratios()
