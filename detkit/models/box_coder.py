"""The R-CNN box parameterisation: boxes <-> deltas (dx, dy, dw, dh) relative to reference boxes.

For a reference box with centre (xr, yr) and size (wr, hr) and a target box (x, y, w, h)::

    dx = wx * (x - xr) / wr     dy = wy * (y - yr) / hr
    dw = ww * log(w / wr)       dh = wh * log(h / hr)

(Girshick et al., "Rich feature hierarchies", appendix C). ``weights`` (wx, wy, ww, wh) scale
the deltas to roughly unit variance: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the RoI head.
Decoding clamps dw, dh at ``log(1000 / 16)`` so a wild prediction cannot overflow ``exp``.
Boxes are xyxy. The arithmetic follows torchvision's ``BoxCoder`` operation for operation, so
decoded boxes are bit-identical to it (tests/models/test_box_coder.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["BoxCoder"]

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode xyxy boxes as deltas against reference boxes, and decode them back."""

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must have 4 values (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """Deltas Float[N,4] of ``boxes`` Float[N,4] w.r.t. ``reference`` Float[N,4] (both xyxy)."""
        wx, wy, ww, wh = self.weights
        ref_w = reference[:, 2] - reference[:, 0]
        ref_h = reference[:, 3] - reference[:, 1]
        ref_x = reference[:, 0] + 0.5 * ref_w
        ref_y = reference[:, 1] + 0.5 * ref_h
        gt_w = boxes[:, 2] - boxes[:, 0]
        gt_h = boxes[:, 3] - boxes[:, 1]
        gt_x = boxes[:, 0] + 0.5 * gt_w
        gt_y = boxes[:, 1] + 0.5 * gt_h
        dx = wx * (gt_x - ref_x) / ref_w
        dy = wy * (gt_y - ref_y) / ref_h
        dw = ww * torch.log(gt_w / ref_w)
        dh = wh * torch.log(gt_h / ref_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes from ``deltas`` Float[N, K*4] (K = 1 or one set per class) and ``reference`` Float[N,4].

        Returns Float[N, K*4] xyxy, the same layout as ``deltas``.
        """
        reference = reference.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (reference[:, 2] - reference[:, 0])[:, None]
        heights = (reference[:, 3] - reference[:, 1])[:, None]
        ctr_x = reference[:, 0, None] + 0.5 * widths
        ctr_y = reference[:, 1, None] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_x = dx * widths + ctr_x
        pred_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        boxes = torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=2)
        return boxes.flatten(1)
