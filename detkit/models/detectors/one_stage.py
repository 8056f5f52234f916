"""OneStageDetector: backbone -> neck -> dense head (YOLO grid, CenterNet heatmap, ...)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...registry import DETECTORS, HEADS, ConfigError
from ...structures import ImageList
from .base import Detector, base_kwargs, build_backbone_and_neck

__all__ = ["OneStageDetector"]


@DETECTORS.register()
class OneStageDetector(Detector):
    """Composes parts only; all maths lives in the head's ``forward`` / ``loss`` / ``predict``.

    Config::

        model:
          type: OneStageDetector
          num_classes: 4
          backbone: {type: ResNet, depth: 18, out_features: [c5]}
          neck: {type: CenterNetUpsample}          # optional
          head: {type: CenterNetHead}               # gets input_shapes and num_classes
          flip_test: false                          # optional, see below
          pixel_mean / pixel_std / size_divisibility # optional, see Detector

    ``flip_test`` runs each padded batch together with its horizontal mirror and lets the head
    merge the two raw outputs before decoding (``head.merge_flip(outputs, mirrored_outputs)``,
    e.g. CenterNet averages the heatmaps). Mirroring the padded tensor keeps every cell aligned,
    since the padded width is a multiple of the head's stride. Heads without ``merge_flip`` use
    the generic box-level ``test_time_aug: {flip: true}`` of ``Detector`` instead.
    """

    # Heads share no base class: any registered head with forward / loss / predict (and,
    # optionally, merge_flip) fits, so its methods are duck-typed.
    head: Any

    def __init__(self, *, backbone: nn.Module, neck: nn.Module | None, head: nn.Module,
                 flip_test: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.neck = neck
        self.head = head
        if flip_test and not hasattr(head, "merge_flip"):
            raise ValueError(f"flip_test: {type(head).__name__} cannot merge mirrored outputs "
                             f"(no merge_flip); use test_time_aug: {{flip: true}} instead")
        self.flip_test = flip_test

    @classmethod
    def from_config(cls, cfg: dict, *, path: str) -> "OneStageDetector":
        if "num_classes" not in cfg:
            raise ConfigError(f"{path}: missing 'num_classes'")
        if "head" not in cfg:
            raise ConfigError(f"{path}: missing 'head'")
        backbone, neck, shapes = build_backbone_and_neck(cfg, path)
        head = HEADS.build(cfg["head"], f"{path}.head", input_shapes=shapes,
                           num_classes=int(cfg["num_classes"]))
        kwargs = base_kwargs(cfg, path, cls.__name__,
                             ("backbone", "neck", "head", "num_classes", "flip_test"))
        try:
            return cls(backbone=backbone, neck=neck, head=head, flip_test=bool(cfg.get("flip_test", False)),
                       **kwargs)
        except ValueError as e:
            raise ConfigError(f"{path}.flip_test: {e}") from None

    def forward_train(self, batch: ImageList, targets: list[dict]) -> dict[str, Tensor]:
        outputs = self.head(self.features(batch))
        return self.head.loss(outputs, targets, batch.image_sizes)

    def forward_test(self, batch: ImageList) -> list[dict]:
        if not self.flip_test:
            return self.head.predict(self.head(self.features(batch)), batch.image_sizes)
        both = ImageList(torch.cat([batch.tensor, batch.tensor.flip(-1)]), batch.image_sizes * 2)
        outputs = self.head(self.features(both))
        n = len(batch)
        merged = self.head.merge_flip({k: v[:n] for k, v in outputs.items()},
                                      {k: v[n:] for k, v in outputs.items()})
        return self.head.predict(merged, batch.image_sizes)
