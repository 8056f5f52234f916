"""Segmentor: backbone -> optional neck -> semantic head (SemanticHead, DeepLabV3Head, ...)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ...registry import DETECTORS
from ...structures import ImageList, dense_to_original
from .base import Detector, build_with_head

__all__ = ["Segmentor", "logits_to_original"]


def logits_to_original(logits: Tensor, meta: dict) -> Tensor:
    """Float[K,Hi,Wi] logits of the pipeline's image -> Float[K,H0,W0] of the original image.

    Bilinear (see ``detkit.structures.dense_to_original``): resizing logits before the argmax
    gives smoother borders than resizing the label map.
    """
    return dense_to_original(logits, meta, mode="bilinear")


@DETECTORS.register()
class Segmentor(Detector):
    """Semantic segmentation model; composes parts only, the head holds the loss.

    Config::

        model:
          type: Segmentor
          num_classes: 5                  # mask values incl. background (shapes: bg + 4)
          backbone: {type: ResNet, depth: 18}
          neck: {type: FPN, out_channels: 128}   # optional (DeepLabV3 uses none)
          head: {type: SemanticHead}      # gets input_shapes and num_classes

    Training returns ``{"loss_sem_seg": ...}``; evaluation returns per image ``sem_seg``
    Int64[H0,W0] (original pixels when targets/metas with ``orig_size``/``scale``/``offset`` are
    passed, else the input image's pixels) and empty ``boxes``/``scores``/``labels``.
    """

    # Heads share no base class: any registered head with forward / loss / image_logits fits,
    # so its methods are duck-typed.
    head: Any

    def __init__(self, *, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.neck = neck
        self.head = head

    @classmethod
    def from_config(cls, cfg: dict, *, path: str) -> "Segmentor":
        return build_with_head(cls, cfg, path)

    def forward(self, images: Sequence[Tensor], targets: list[dict] | None = None):
        if self.training:
            return super().forward(images, targets)
        batch = self.preprocess(images)
        logits = self.head.image_logits(self.head(self.features(batch)), batch.image_sizes)
        metas = targets if targets is not None else [{}] * len(logits)
        return [self._result(logits_to_original(lg, meta)) for lg, meta in zip(logits, metas)]

    def forward_train(self, batch: ImageList, targets: list[dict]) -> dict[str, Tensor]:
        return self.head.loss(self.head(self.features(batch)), targets, batch.image_sizes)

    def forward_test(self, batch: ImageList) -> list[dict]:
        logits = self.head.image_logits(self.head(self.features(batch)), batch.image_sizes)
        return [self._result(lg) for lg in logits]

    @staticmethod
    def _result(logits: Tensor) -> dict[str, Tensor]:
        device = logits.device
        return {"sem_seg": logits.argmax(0), "boxes": torch.zeros(0, 4, device=device),
                "scores": torch.zeros(0, device=device),
                "labels": torch.zeros(0, dtype=torch.int64, device=device)}
