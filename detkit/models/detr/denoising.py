"""Contrastive denoising queries (DN-DETR / DINO, as RT-DETR and D-FINE train them).

Legend: B images, n_b boxes of image b, G = max(1, num_denoising // max_b n_b) groups, N = max_b n_b,
Nd = 2 * N * G denoising queries, Q matching queries, D channels, C classes. Targets are in the
DETR format: ``labels`` Int64[n], ``boxes`` Float[n,4] cxcywh normalised.

Each group holds every ground-truth box twice: a positive copy jittered by less than half its
size (to be reconstructed) and a negative copy jittered by half to one size (to be classified as
background). Labels are flipped to a random class with probability ``label_noise_ratio / 2``.
The attention mask keeps groups from seeing each other and the matching queries from seeing any
denoising query (the denoising queries may see the matching ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .position import cxcywh_to_xyxy, inverse_sigmoid, xyxy_to_cxcywh

__all__ = ["DenoisingQueries", "contrastive_denoising_queries", "denoising_attention_mask"]


@dataclass
class DenoisingQueries:
    """embeddings Float[B,Nd,D], box_logits Float[B,Nd,4] (inverse sigmoid of noisy cxcywh),
    attn_mask Float[Nd+Q, Nd+Q] (0 or -inf), meta: ``dn_positive_idx`` [Int64[n_b*G]] * B,
    ``dn_num_group`` G, ``dn_num_split`` [Nd, Q]."""

    embeddings: Tensor
    box_logits: Tensor
    attn_mask: Tensor
    meta: dict


def denoising_attention_mask(group_size: int, num_groups: int, num_queries: int,
                             device: torch.device | None = None) -> Tensor:
    """Float[Nd+Q, Nd+Q], ``-inf`` where a row query may not attend to a column query."""
    num_dn = group_size * num_groups
    mask = torch.zeros(num_dn + num_queries, num_dn + num_queries, device=device)
    mask[num_dn:, :num_dn] = float("-inf")
    for g in range(num_groups):
        start, end = g * group_size, (g + 1) * group_size
        mask[start:end, :start] = float("-inf")
        mask[start:end, end:num_dn] = float("-inf")
    return mask


def _noisy_boxes(boxes: Tensor, negative: Tensor, scale: float, generator: torch.Generator | None) -> Tensor:
    """boxes Float[B,Nd,4] cxcywh, negative Float[B,Nd,1] (1 = negative copy) -> jittered cxcywh."""
    corners = cxcywh_to_xyxy(boxes)
    half_size = (boxes[..., 2:] * 0.5).repeat(1, 1, 2) * scale
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    magnitude = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    magnitude = magnitude + negative          # negatives move by 1-2 half sizes, positives by 0-1
    corners = (corners + sign * magnitude * half_size).clamp(0.0, 1.0)
    return xyxy_to_cxcywh(corners)


def contrastive_denoising_queries(targets: Sequence[dict], *, num_classes: int, num_queries: int,
                                  label_embed: nn.Embedding, num_denoising: int = 100,
                                  label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                                  generator: torch.Generator | None = None) -> DenoisingQueries | None:
    """Build the denoising queries of a batch, or None when there is nothing to denoise (no
    denoising asked, or no image has a box). ``label_embed`` has C + 1 rows, row C (padding of
    images with fewer boxes) being the "no label" embedding. Random draws come from ``generator``
    (the global generator when None), in the order: label flips, new labels, box signs, box sizes."""
    counts = [int(t["labels"].numel()) for t in targets]
    max_boxes = max(counts, default=0)
    if num_denoising <= 0 or max_boxes == 0:
        return None
    device = label_embed.weight.device
    groups = max(1, num_denoising // max_boxes)
    batch = len(targets)
    labels = torch.full((batch, max_boxes), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(batch, max_boxes, 4, device=device)
    present = torch.zeros(batch, max_boxes, dtype=torch.bool, device=device)
    for b, (t, n) in enumerate(zip(targets, counts)):
        labels[b, :n] = t["labels"].to(device)
        boxes[b, :n] = t["boxes"].to(device, boxes.dtype)
        present[b, :n] = True
    labels = labels.repeat(1, 2 * groups)
    boxes = boxes.repeat(1, 2 * groups, 1)
    present = present.repeat(1, 2 * groups)
    negative = torch.zeros(batch, 2 * max_boxes, 1, device=device)
    negative[:, max_boxes:] = 1
    negative = negative.repeat(1, groups, 1)
    positive = (1 - negative[..., 0]).bool() & present
    positive_idx = torch.nonzero(positive)[:, 1].split([n * groups for n in counts])

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, generator=generator, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint(0, num_classes, labels.shape, generator=generator, device=device)
        labels = torch.where(flip & present, random_labels, labels)
    if box_noise_scale > 0:
        boxes = _noisy_boxes(boxes, negative, box_noise_scale, generator)
    num_dn = 2 * max_boxes * groups
    return DenoisingQueries(
        embeddings=label_embed(labels), box_logits=inverse_sigmoid(boxes),
        attn_mask=denoising_attention_mask(2 * max_boxes, groups, num_queries, device),
        meta={"dn_positive_idx": list(positive_idx), "dn_num_group": groups,
              "dn_num_split": [num_dn, num_queries]})
