"""A cheap check of frozen features: weighted k-NN classification of object crops.

The protocol of Wu et al. 2018 (InstDisc) as used by DINO: cosine similarity to a labelled
bank, the k nearest vote with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_predict", "object_crops"]


@torch.no_grad()
def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, *, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> Tensor:
    """Labels Int64[Q] for ``queries`` Float[Q,C] from ``bank`` Float[N,C] with Int64[N] labels."""
    sims = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).t()   # [Q,N]
    top, index = sims.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), num_classes, dtype=torch.float32)
    votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
    return votes.argmax(dim=1)


def object_crops(dataset, size: int, *, context: float = 0.1, limit: int | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Every box of a detkit dataset cut out (with ``context`` margin) and resized to ``size``.

    Returns (Float[M,3,size,size] in [0,1], Int64[M] labels); crowd boxes are skipped and at
    most ``limit`` images are read.
    """
    import cv2

    crops, labels = [], []
    for record in dataset.records[:limit]:
        image = dataset.read(record)
        h, w = image.shape[:2]
        for box, label, crowd in zip(record.boxes, record.labels, record.iscrowd):
            if crowd:
                continue
            x0, y0, x1, y1 = box.tolist()
            mx, my = context * (x1 - x0), context * (y1 - y0)
            xa, ya = int(max(0, np.floor(x0 - mx))), int(max(0, np.floor(y0 - my)))
            xb, yb = int(min(w, np.ceil(x1 + mx))), int(min(h, np.ceil(y1 + my)))
            if xb <= xa or yb <= ya:
                continue
            crops.append(cv2.resize(image[ya:yb, xa:xb], (size, size), interpolation=cv2.INTER_LINEAR))
            labels.append(int(label))
    stacked = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    return stacked, torch.tensor(labels, dtype=torch.long)
