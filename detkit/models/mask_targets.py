"""Mask R-CNN training targets: which RoIs train the mask head, and their M x M mask targets.

Legend: B images, S_b sampled RoIs of image b, P_b of them positive, G ground-truth instances
of an image (crowd ones included), H x W the training image, M the mask resolution (28).
Boxes are xyxy absolute pixels of the training image.

The mask target of a positive RoI is its matched ground-truth mask cropped at the RoI and
resampled to M x M by RoIAlign (``aligned=False``, adaptive sampling), exactly as torchvision's
``project_masks_on_boxes``: target pixel (i, j) averages the bilinearly interpolated mask at
``ceil(h / M) x ceil(w / M)`` points of its bin, where pixel k of the mask sits at coordinate k.
Targets are therefore soft near the mask border (values in [0, 1]); the loss is a BCE on them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["positive_rois", "project_masks"]


def positive_rois(rois: list[Tensor], samples: list[dict[str, Tensor]], num_classes: int
                  ) -> list[dict[str, Tensor]]:
    """The foreground RoIs among the sampled ones, per image: ``boxes`` Float[P_b,4],
    ``labels`` Int64[P_b] (their ground-truth class) and ``gt_index`` Int64[P_b] (index of the
    matched instance in the target's ``boxes`` / ``masks``), in sampling order.

    ``samples`` are ``RoIHeadBase.sample_proposals``' dicts (``labels`` with ``num_classes`` for
    background, ``gt_index``).
    """
    out = []
    for boxes, sample in zip(rois, samples):
        fg = torch.where(sample["labels"] < num_classes)[0]
        out.append({"boxes": boxes[fg], "labels": sample["labels"][fg], "gt_index": sample["gt_index"][fg]})
    return out


def project_masks(gt_masks: Tensor, boxes: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """Float[P,size,size] targets: ``gt_masks[gt_index[p]]`` (Bool/UInt8[G,H,W]) cropped at
    ``boxes[p]`` (Float[P,4]) and resampled by RoIAlign (see the module docstring).

    Only the matched instances are converted to float, so an image with many instances but few
    positive RoIs stays cheap.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    used, slot = torch.unique(gt_index, return_inverse=True)
    masks = gt_masks[used].to(device=boxes.device, dtype=boxes.dtype)[:, None]   # Float[U,1,H,W]
    rois = torch.cat([slot.to(boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(masks, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=False)[:, 0]
