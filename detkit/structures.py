"""Small shared data structures: ShapeSpec, ImageList and box helpers.

Legend: N boxes, B images, C channels, H x W image or feature size.
Boxes are ``xyxy`` absolute pixels unless a name says otherwise (``cxcywh``, ``xywh``).
The box maths is ``torchvision.ops`` wherever it exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, box_iou, clip_boxes_to_image, remove_small_boxes

__all__ = ["ShapeSpec", "ImageList", "box_convert", "box_iou", "clip_boxes_to_image",
           "remove_small_boxes", "boxes_to_original", "dense_to_original"]


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (input pixels per feature pixel) of one named feature map."""

    channels: int
    stride: int


class ImageList:
    """A padded batch: ``tensor`` Float[B,C,Hp,Wp] and the unpadded ``image_sizes`` [(H, W)] * B."""

    def __init__(self, tensor: Tensor, image_sizes: list[tuple[int, int]]):
        self.tensor = tensor
        self.image_sizes = image_sizes

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, device) -> "ImageList":
        return ImageList(self.tensor.to(device), self.image_sizes)

    @staticmethod
    def from_tensors(images: Sequence[Tensor], size_divisibility: int = 0,
                     pad_value: float = 0.0) -> "ImageList":
        """Pad Float[C,Hi,Wi] images bottom/right to a common size (a multiple of ``size_divisibility``)."""
        if len(images) == 0:
            raise ValueError("ImageList.from_tensors: empty list of images")
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        max_h = max(h for h, _ in sizes)
        max_w = max(w for _, w in sizes)
        if size_divisibility > 1:
            max_h = int(math.ceil(max_h / size_divisibility) * size_divisibility)
            max_w = int(math.ceil(max_w / size_divisibility) * size_divisibility)
        if len(images) == 1:
            h, w = sizes[0]
            batch = F.pad(images[0], (0, max_w - w, 0, max_h - h), value=pad_value)[None]
        else:
            batch = images[0].new_full((len(images), images[0].shape[0], max_h, max_w), pad_value)
            for im, out in zip(images, batch):
                out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return ImageList(batch.contiguous(), sizes)


def boxes_to_original(boxes: Tensor, meta: dict) -> Tensor:
    """Map Float[N,4] xyxy boxes from pipeline-output pixels back to original-image pixels.

    The data pipeline records ``scale`` (sx, sy) and ``offset`` (ox, oy) such that
    ``transformed = original * scale + offset`` (offset is the letterbox padding, else 0), and
    ``orig_size`` (H0, W0). Boxes are clipped to the original image. A ``meta`` without ``scale``
    means the pipeline did not resize: boxes are returned unchanged (still clipped if
    ``orig_size`` is known).
    """
    out = boxes
    if "scale" in meta:
        scale = torch.as_tensor(meta["scale"], dtype=boxes.dtype, device=boxes.device).reshape(-1)
        offset = torch.as_tensor(meta.get("offset", (0.0, 0.0)), dtype=boxes.dtype,
                                 device=boxes.device).reshape(-1)
        if scale.numel() == 1:
            scale = scale.repeat(2)
        out = (boxes - offset.repeat(2)) / scale.repeat(2)
        # a negative scale (a horizontal / vertical flip) swaps the corners back into order
        out = torch.cat([torch.minimum(out[:, :2], out[:, 2:]), torch.maximum(out[:, :2], out[:, 2:])], dim=1)
    if "orig_size" in meta:
        h0, w0 = (int(v) for v in meta["orig_size"])
        out = clip_boxes_to_image(out, (h0, w0))
    return out


def dense_to_original(dense: Tensor, meta: dict, mode: str = "nearest-exact") -> Tensor:
    """Map a dense map [..., Hi, Wi] of the pipeline's output image back to original pixels.

    Undoes ``transformed = original * scale + offset``: crops the region the original image
    occupies (dropping letterbox padding) and resizes it to ``orig_size`` (H0, W0). Use
    ``mode="nearest-exact"`` for label maps (labels must not be interpolated) and ``"bilinear"``
    for logits. Without ``orig_size`` in ``meta`` the map is returned unchanged.
    """
    if "orig_size" not in meta:
        return dense
    h0, w0 = (int(v) for v in meta["orig_size"])
    if tuple(dense.shape[-2:]) == (h0, w0):
        return dense
    sx, sy = (abs(float(v)) for v in torch.as_tensor(meta.get("scale", (1.0, 1.0))).reshape(-1).expand(2))
    ox, oy = (float(v) for v in torch.as_tensor(meta.get("offset", (0.0, 0.0))).reshape(-1))
    top, left = max(int(round(oy)), 0), max(int(round(ox)), 0)
    bottom = min(top + max(int(round(h0 * sy)), 1), dense.shape[-2])
    right = min(left + max(int(round(w0 * sx)), 1), dense.shape[-1])
    region = dense[..., top:bottom, left:right]
    if tuple(region.shape[-2:]) == (h0, w0):
        return region
    lead = region.shape[:-2]
    flat = region.reshape(1, -1, *region.shape[-2:]).float()
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    resized = F.interpolate(flat, size=(h0, w0), mode=mode, **kwargs)
    out = resized.reshape(*lead, h0, w0)
    return out if mode == "bilinear" else out.to(dense.dtype)
