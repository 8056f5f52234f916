"""Object-aware cropping: cut every sample's views from one unsupervised object proposal.

Image-level methods (MoCo, SimCLR, BYOL, SimSiam, DINO) learn what the views of one image share.
On object-centric photos (ImageNet) that is the object; on scene images with a few small objects
(COCO, shapes) it is mostly the background, and the network learns to match backgrounds. Mishra
et al. ("Object-aware Cropping for Self-Supervised Learning", TMLR 2022) replace one or both
random scene crops with crops from an *unsupervised* object proposal (their final recipe: the
proposal crop and a dilated version of it) and report large gains over scene cropping when
pre-training MoCo v2 on OpenImages, and on COCO / VOC detection. This module implements the
variant that takes both views from one dilated proposal, so that it composes with any method's
view groups (DINO's local crops too); SoCo (Wei et al. 2021) also builds on proposals.

Proposals here need no training and no labels: MSER regions (Matas et al. 2002, OpenCV's
``cv2.MSER``) of the lightly blurred image in three channels (grey, and the two chromatic channels
of CIE Lab, so that a red shape on a grey-equal green background is found), and the bounding
boxes of the outer contours of its Canny edges (MSER misses perfectly flat regions, which have
no intensity levels to be stable over), kept when both sides are at least ``min_size`` px and
the area at most ``max_area`` of the image. One proposal is drawn per sample (uniformly), its box
is scaled by a factor drawn from ``dilate`` about its centre (made square first: the views are
square) and clipped to the image; every view of the sample (global and local) is then cut from
that region by its group's random resized crop. With probability ``1 - p``, or when an image has
no proposal, the whole image is used as before.

Config (``MultiViewDataset``)::

    proposal_crops: {p: 1.0, dilate: [1.5, 2.5], min_size: 8, max_area: 0.5, delta: 6}
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = ["ProposalCrops", "region_proposals"]


def region_proposals(image: np.ndarray, *, min_size: int = 8, max_area: float = 0.5,
                     delta: int = 6) -> np.ndarray:
    """UInt8[H,W,3] RGB -> Float[N,4] xyxy boxes of MSER regions and edge contours (unique, by area)."""
    h, w = image.shape[:2]
    blurred = cv2.GaussianBlur(image, (5, 5), 0)
    lab = cv2.cvtColor(blurred, cv2.COLOR_RGB2LAB)
    # MSER_create is missing from OpenCV's type stubs
    mser = cv2.MSER_create(delta=int(delta), min_area=max(int(min_size) ** 2 // 4, 4),  # type: ignore[attr-defined]
                           max_area=max(int(max_area * h * w), 5))
    boxes = [np.zeros((0, 4), np.float32)]
    edges = np.zeros((h, w), np.uint8)
    for channel in (cv2.cvtColor(blurred, cv2.COLOR_RGB2GRAY), lab[..., 1], lab[..., 2]):
        channel = np.ascontiguousarray(channel)
        _, found = mser.detectRegions(channel)
        if len(found):
            boxes.append(np.asarray(found, dtype=np.float32).reshape(-1, 4))
        edges = np.maximum(edges, cv2.Canny(channel, 40, 100))
    contours, _ = cv2.findContours(cv2.dilate(edges, np.ones((3, 3), np.uint8)), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        boxes.append(np.asarray([cv2.boundingRect(c) for c in contours], dtype=np.float32))
    xywh = np.unique(np.concatenate(boxes), axis=0)
    keep = (xywh[:, 2] >= min_size) & (xywh[:, 3] >= min_size) & (xywh[:, 2] * xywh[:, 3] <= max_area * h * w)
    xywh = xywh[keep]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return xyxy[np.argsort(xywh[:, 2] * xywh[:, 3], kind="stable")]


class ProposalCrops:
    """Image -> the region of one dilated proposal (see the module docstring)."""

    def __init__(self, *, p: float = 1.0, dilate: Sequence[float] | float = (1.5, 2.5), min_size: int = 8,
                 max_area: float = 0.5, delta: int = 6):
        lo, hi = (float(dilate), float(dilate)) if isinstance(dilate, (int, float)) else map(float, dilate)
        if not 0.0 <= float(p) <= 1.0 or not 1.0 <= lo <= hi:
            raise ValueError(f"proposal_crops: need 0 <= p <= 1 and dilate [min, max] with 1 <= min <= max, "
                             f"got p={p}, dilate={dilate}")
        if int(min_size) < 2 or not 0.0 < float(max_area) <= 1.0 or int(delta) < 1:
            raise ValueError(f"proposal_crops: need min_size >= 2, 0 < max_area <= 1, delta >= 1, got "
                             f"min_size={min_size}, max_area={max_area}, delta={delta}")
        self.p, self.dilate = float(p), (lo, hi)
        self.min_size, self.max_area, self.delta = int(min_size), float(max_area), int(delta)

    def region(self, image: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """The (x1, y1, x2, y2) integer region to cut, or None for the whole image."""
        if rng.random() >= self.p:
            return None
        boxes = region_proposals(image, min_size=self.min_size, max_area=self.max_area, delta=self.delta)
        if len(boxes) == 0:
            return None
        x1, y1, x2, y2 = boxes[rng.integers(len(boxes))]
        side = max(x2 - x1, y2 - y1) * rng.uniform(*self.dilate)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        h, w = image.shape[:2]
        left, top = int(round(max(cx - side / 2, 0))), int(round(max(cy - side / 2, 0)))
        right, bottom = int(round(min(cx + side / 2, w))), int(round(min(cy + side / 2, h)))
        return left, top, max(right, left + 1), max(bottom, top + 1)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        box = self.region(image, rng)
        if box is None:
            return image
        x1, y1, x2, y2 = box
        return np.ascontiguousarray(image[y1:y2, x1:x2])
