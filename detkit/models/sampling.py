"""Balanced foreground / background sampling of anchors or proposals for a loss mini-batch.

Each image contributes ``num_samples`` candidates, at most ``positive_fraction`` of them
foreground; the rest is filled with background (fewer when there are not enough). Candidates are
drawn uniformly without replacement with ``torch.randperm``: first the positives, then the
negatives, image by image. That is the order torchvision's ``BalancedPositiveNegativeSampler``
draws in, so seeding the global generator identically before both models yields the same
samples (the parity test relies on it). Pass a ``torch.Generator`` to make the sampling of a
model independent of the global random state.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_balanced"]


def sample_balanced(positive: Tensor, negative: Tensor, num_samples: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample from Bool[N] ``positive`` / ``negative`` masks -> (Int64[P] pos idx, Int64[Q] neg idx).

    ``P = min(#positive, int(num_samples * positive_fraction))`` and
    ``Q = min(#negative, num_samples - P)``. Indices are in ascending order.
    """
    pos_idx = torch.where(positive)[0]
    neg_idx = torch.where(negative)[0]
    num_pos = min(pos_idx.numel(), int(num_samples * positive_fraction))
    num_neg = min(neg_idx.numel(), num_samples - num_pos)
    device = positive.device
    gen_device = generator.device if generator is not None else device
    perm_pos = torch.randperm(pos_idx.numel(), device=gen_device, generator=generator)[:num_pos]
    perm_neg = torch.randperm(neg_idx.numel(), device=gen_device, generator=generator)[:num_neg]
    pos = pos_idx[perm_pos.to(device)].sort().values
    neg = neg_idx[perm_neg.to(device)].sort().values
    return pos, neg
