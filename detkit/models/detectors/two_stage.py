"""TwoStageDetector: backbone -> neck -> RPN (proposals) -> RoI head (Faster R-CNN)
[-> mask head (Mask R-CNN)]."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ...registry import DETECTORS, HEADS, ConfigError
from ...structures import ImageList
from ..mask_targets import positive_rois
from .base import Detector, base_kwargs, build_backbone_and_neck

__all__ = ["TwoStageDetector"]


@DETECTORS.register()
class TwoStageDetector(Detector):
    """Composes parts only; the maths lives in ``RPNHead`` and ``RoIHead``.

    Config::

        model:
          type: TwoStageDetector
          num_classes: 80
          backbone: {type: ResNet, depth: 50, norm: FrozenBN, frozen_stages: 1}
          neck: {type: FPN, out_channels: 256, extra_levels: maxpool}    # optional (C4: none)
          rpn: {type: RPNHead}                                            # gets input_shapes
          roi_head: {type: RoIHead, box_head: {type: TwoMLPHead}}         # + num_classes
          mask_head: {type: MaskRoIHead}                                  # optional (Mask R-CNN)
          init_from_torchvision: path/to/fasterrcnn_resnet50_fpn.pth     # optional
          pixel_mean / pixel_std / size_divisibility                      # optional, see Detector

    ``init_from_torchvision`` loads a torchvision ``fasterrcnn_resnet50_fpn`` (v1) state dict, or
    ``maskrcnn_resnet50_fpn`` (v1) with a mask head, through ``detkit.models.convert`` after the
    model is built.

    With a ``mask_head`` (trained on the positive RoIs' instance masks, targets' ``masks``),
    evaluation results also hold ``masks`` Bool[K,H,W]: in original-image pixels (H0 x W0) when
    metas are passed, else in the pixels of the input images.
    """

    # The parts are used through their own methods (RPNHead.predict, RoIHead.sample_proposals ...).
    backbone: Any
    neck: Any
    rpn: Any
    roi_head: Any
    mask_head: Any

    def __init__(self, *, backbone: nn.Module, neck: nn.Module | None, rpn: nn.Module,
                 roi_head: nn.Module, mask_head: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        if mask_head is not None and self.test_time_aug is not None:
            raise ValueError("test_time_aug merges boxes only; it cannot be combined with a mask_head")
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_head = roi_head
        self.mask_head = mask_head

    @classmethod
    def from_config(cls, cfg: dict, *, path: str) -> "TwoStageDetector":
        for key in ("num_classes", "rpn", "roi_head"):
            if key not in cfg:
                raise ConfigError(f"{path}: missing '{key}'")
        backbone, neck, shapes = build_backbone_and_neck(cfg, path)
        rpn = HEADS.build(cfg["rpn"], f"{path}.rpn", input_shapes=shapes)
        roi_head = HEADS.build(cfg["roi_head"], f"{path}.roi_head", input_shapes=shapes,
                               num_classes=int(cfg["num_classes"]))
        mask_head = None
        if cfg.get("mask_head") is not None:
            mask_head = HEADS.build(cfg["mask_head"], f"{path}.mask_head", input_shapes=shapes,
                                    num_classes=int(cfg["num_classes"]))
        components = ("backbone", "neck", "rpn", "roi_head", "mask_head", "num_classes",
                      "init_from_torchvision")
        try:
            model = cls(backbone=backbone, neck=neck, rpn=rpn, roi_head=roi_head, mask_head=mask_head,
                        **base_kwargs(cfg, path, cls.__name__, components))
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        weights = cfg.get("init_from_torchvision")
        if weights:
            from ..convert import load_torchvision_weights  # convert imports detectors' parts

            arch = "maskrcnn_resnet50_fpn" if mask_head is not None else "fasterrcnn_resnet50_fpn"
            try:
                load_torchvision_weights(model, weights, arch=arch)
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"{path}.init_from_torchvision: {e}") from e
        return model

    def proposals(self, features: dict[str, Tensor], batch: ImageList) -> tuple[dict, list[Tensor]]:
        """RPN raw outputs and the proposal boxes Float[P_b,4] of each image."""
        rpn_outputs = self.rpn(features)
        return rpn_outputs, [p["boxes"] for p in self.rpn.predict(rpn_outputs, batch.image_sizes)]

    def forward_train(self, batch: ImageList, targets: list[dict]) -> dict[str, Tensor]:
        features = self.features(batch)
        rpn_outputs, proposals = self.proposals(features, batch)
        losses = self.rpn.loss(rpn_outputs, targets, batch.image_sizes)
        rois, samples = self.roi_head.sample_proposals(proposals, targets)
        outputs = self.roi_head(features, rois, batch.image_sizes)
        losses.update(self.roi_head.loss(outputs, samples))
        if self.mask_head is not None:
            positives = positive_rois(rois, samples, self.roi_head.num_classes)
            logits = self.mask_head(features, [p["boxes"] for p in positives], batch.image_sizes)
            losses.update(self.mask_head.loss(logits, positives, targets))
        return losses

    def forward_test(self, batch: ImageList) -> list[dict]:
        """Detections in input pixels; with a mask head also ``mask_probs`` Float[K,M,M] per
        detection, pasted into ``masks`` by ``forward`` once the boxes are in their final pixels."""
        features = self.features(batch)
        _, proposals = self.proposals(features, batch)
        outputs = self.roi_head(features, proposals, batch.image_sizes)
        detections = self.roi_head.predict(outputs, batch.image_sizes)
        if self.mask_head is not None:
            logits = self.mask_head(features, [d["boxes"] for d in detections], batch.image_sizes)
            detections = self.mask_head.predict(logits, detections)
        return detections

    def forward(self, images: Sequence[Tensor], targets: list[dict] | None = None):
        results = super().forward(images, targets)
        if self.training or self.mask_head is None:
            return results
        sizes = [tuple(int(v) for v in meta["orig_size"]) if targets is not None and "orig_size" in meta
                 else tuple(image.shape[-2:]) for image, meta in zip(images, targets or [{}] * len(images))]
        return [self.mask_head.paste(r, size) for r, size in zip(results, sizes)]
