"""OneStageDetector: backbone -> neck -> dense head (YOLO grid, CenterNet heatmap, ...)."""

from __future__ import annotations

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
          pixel_mean / pixel_std / size_divisibility # optional, see Detector
    """

    def __init__(self, *, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.neck = neck
        self.head = head

    @classmethod
    def from_config(cls, cfg: dict, *, path: str) -> "OneStageDetector":
        if "num_classes" not in cfg:
            raise ConfigError(f"{path}: missing 'num_classes'")
        if "head" not in cfg:
            raise ConfigError(f"{path}: missing 'head'")
        backbone, neck, shapes = build_backbone_and_neck(cfg, path)
        head = HEADS.build(cfg["head"], f"{path}.head", input_shapes=shapes,
                           num_classes=int(cfg["num_classes"]))
        kwargs = base_kwargs(cfg, path, cls.__name__, ("backbone", "neck", "head", "num_classes"))
        return cls(backbone=backbone, neck=neck, head=head, **kwargs)

    def features(self, batch: ImageList) -> dict[str, Tensor]:
        feats = self.backbone(batch.tensor)
        return self.neck(feats) if self.neck is not None else feats

    def forward_train(self, batch: ImageList, targets: list[dict]) -> dict[str, Tensor]:
        outputs = self.head(self.features(batch))
        return self.head.loss(outputs, targets, batch.image_sizes)

    def forward_test(self, batch: ImageList) -> list[dict]:
        outputs = self.head(self.features(batch))
        return self.head.predict(outputs, batch.image_sizes)
