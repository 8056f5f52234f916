"""Batched, exportable post-processing pieces shared by every exported detector.

Legend: B images, G NMS groups (an image, or an (image, class) pair), C score columns per
group, N candidates per group, M kept boxes, K output rows per image.

Everything here works on whole batches with shapes taken from tensors (no Python loops over
images, no ``int()`` of a size), so a traced graph keeps a dynamic batch and image size. The
one operator without a plain-PyTorch ONNX form is NMS: :class:`GroupedNMS` runs torchvision's
``nms`` in PyTorch and exports as ONNX ``NonMaxSuppression`` (same greedy rule: suppress when
IoU > threshold, highest score first).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

__all__ = ["GroupedNMS", "grouped_nms", "top_per_image", "clip_boxes", "dynamic_min", "image_hw",
           "unpadded_sizes", "INVALID_SCORE", "SIZES_DEFAULT"]

# Scores are probabilities (>= 0); a masked-out candidate gets this value, and NMS's score
# threshold sits halfway, so the strict / non-strict comparison of a runtime cannot matter.
INVALID_SCORE = -1.0
_SCORE_CUT = -0.5
_MAX_OUTPUT = 1 << 30
# The default of the graph's ``image_sizes`` input (an ONNX initializer of the same name): every
# size is capped at the padded input, so "larger than any input" means "the padded input size".
SIZES_DEFAULT = (1 << 31) - 1


class GroupedNMS(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` semantics: per group and score column, greedy NMS over the
    candidates whose score is not masked.

    Args (of ``apply``): boxes Float[G,N,4] xyxy, scores Float[G,C,N] (``INVALID_SCORE`` =
    skip), iou_threshold float.
    Returns Int64[M,3] rows (group, column, candidate), group-major, then column, then score.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
        rows = []
        for g in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                idx = torch.where(scores[g, c] > _SCORE_CUT)[0]
                keep = idx[nms(boxes[g, idx], scores[g, c, idx], float(iou_threshold))]
                rows.append(torch.stack([torch.full_like(keep, g), torch.full_like(keep, c), keep], 1))
        if not rows:
            return torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
        return torch.cat(rows)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float):  # pragma: no cover - runs in the exporter
        # center_point_box=0 reads corners as (y1, x1, y2, x2); IoU is symmetric in x and y, so
        # xyxy corners give the same result (torchvision's own nms export relies on this too).
        max_out = g.op("Constant", value_t=torch.tensor([_MAX_OUTPUT], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([float(iou_threshold)], dtype=torch.float32))
        cut = g.op("Constant", value_t=torch.tensor([_SCORE_CUT], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, cut)


def grouped_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Int64[M,3] (group, column, candidate) kept by NMS; see :class:`GroupedNMS`."""
    return GroupedNMS.apply(boxes.float(), scores.float(), float(iou_threshold))


def image_hw(images: Tensor) -> Tensor:
    """Int64[2] (H, W) of Float[B,3,H,W] as a tensor (stays dynamic in a traced graph)."""
    return torch._shape_as_tensor(images)[2:]


def unpadded_sizes(images: Tensor, image_sizes: Tensor | None) -> Tensor:
    """Int64[B,2] (H, W) of each image before padding, from ``image_sizes`` Int64[B,2] or [1,2]
    (one row for all images), each capped at the padded input size of Float[B,3,H,W]
    (``None``: the padded size)."""
    if image_sizes is None:
        image_sizes = image_hw(images)[None]
    rows = torch.zeros_like(images[:, :1, 0, 0], dtype=torch.int64)              # [B,1]
    return torch.minimum(image_sizes.to(torch.int64), image_hw(images)) + rows


def clip_boxes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip Float[B,...,4] xyxy to [0, W_b] x [0, H_b] of image b, ``sizes`` Int64[B,2] (H, W)."""
    shape = (-1,) + (1,) * (boxes.dim() - 1)
    h = sizes[:, 0].to(boxes.dtype).reshape(shape)
    w = sizes[:, 1].to(boxes.dtype).reshape(shape)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x = torch.minimum(torch.maximum(boxes[..., 0::2], zero), w)
    y = torch.minimum(torch.maximum(boxes[..., 1::2], zero), h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def dynamic_min(k: int, size: Tensor | int) -> Tensor | int:
    """``min(k, size)`` that stays a graph value when ``size`` is a traced size."""
    if isinstance(size, Tensor):
        return torch.clamp(size, max=k)
    return min(k, size)


def top_per_image(image_ids: Tensor, scores: Tensor, num_images: int, k: int
                  ) -> tuple[Tensor, Tensor]:
    """Rank M scored items per image and keep the ``k`` best of each.

    Args: image_ids Int64[M], scores Float[M] (>= 0), num_images B.
    Returns (index Int64[B,k] into the M items, valid Bool[B,k]); invalid rows point at item M,
    so gather from the payload with one padding row appended (see :func:`gather_padded`).
    """
    m = scores.shape[0]
    dense = torch.full((num_images, m + k), INVALID_SCORE, dtype=scores.dtype, device=scores.device)
    dense[image_ids, torch.arange(m, device=scores.device)] = scores
    top, index = dense.topk(k, dim=1)
    valid = top > _SCORE_CUT
    return torch.where(valid, index, torch.full_like(index, m)), valid


def gather_padded(values: Tensor, index: Tensor, fill: float = 0.0) -> Tensor:
    """``values`` [M,...] with one ``fill`` row appended, gathered at Int64[B,k] -> [B,k,...]."""
    pad = torch.full((1,) + tuple(values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    return torch.cat([values, pad])[index]
