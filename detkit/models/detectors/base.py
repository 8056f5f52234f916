"""The one small base class of every detkit detector: normalise, pad, and map results back.

A detector is called ``model(images, targets=None)`` with ``images`` a list of Float[3,Hi,Wi]
RGB tensors in [0, 1] (the data pipeline's output, not yet normalised or padded):

* training: ``targets`` is required; returns ``dict[str, Tensor]`` of weighted ``loss_*`` terms;
* evaluation: returns one dict per image with ``boxes`` Float[K,4] xyxy, ``scores`` Float[K],
  ``labels`` Int64[K] (and ``sem_seg`` for segmentors). When ``targets`` (or plain meta dicts
  with ``scale``/``offset``/``orig_size``) are given, boxes are mapped back to original-image
  pixels; otherwise they are in the pixels of the images passed in.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ...registry import BACKBONES, HEADS, NECKS, ConfigError, check_kwargs
from ...structures import ImageList, ShapeSpec, boxes_to_original
from ..multiscale import MultiScaleTrain, TestTimeAug

__all__ = ["Detector", "build_backbone_and_neck"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Detector(nn.Module):
    """Base: pixel normalisation, padding to ``size_divisibility``, result mapping.

    ``multiscale_train`` (``{short_edges: [...], max_size}``) resizes each training batch to a
    random size; ``test_time_aug`` (``{scales: [...], flip, merge: nms|wbf, iou_thr}``) runs
    evaluation on several views and merges them (see ``detkit/models/multiscale.py``).
    """

    backbone: nn.Module      # set by every subclass
    neck: nn.Module | None
    pixel_mean: Tensor  # buffer Float[3,1,1]
    pixel_std: Tensor  # buffer Float[3,1,1]

    def __init__(self, *, pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD, size_divisibility: int = 32,
                 multiscale_train: dict | None = None, test_time_aug: dict | None = None):
        super().__init__()
        self.multiscale_train = MultiScaleTrain(**multiscale_train) if multiscale_train else None
        self.test_time_aug = TestTimeAug(**test_time_aug) if test_time_aug else None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.size_divisibility = int(size_divisibility)

    def preprocess(self, images: Sequence[Tensor]) -> ImageList:
        """Normalise each Float[3,Hi,Wi] image and pad the batch; returns an ImageList."""
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images)
        if len(images) == 0:
            raise ValueError("detector called with an empty list of images")
        normed = []
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"image {i}: expected Float[3,H,W], got shape {tuple(im.shape)}")
            normed.append((im.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(normed, self.size_divisibility)

    @staticmethod
    def check_targets(targets, num_images: int) -> None:
        if targets is None:
            raise ValueError("training mode needs targets (a list with one dict per image)")
        if len(targets) != num_images:
            raise ValueError(f"got {num_images} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            boxes = t.get("boxes")
            if boxes is None or boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"target {i}: 'boxes' must be Float[N,4], got "
                                 f"{None if boxes is None else tuple(boxes.shape)}")
            if not torch.isfinite(boxes).all():
                raise ValueError(f"target {i} (image_id {t.get('image_id')}): non-finite box values")

    def forward(self, images: Sequence[Tensor], targets: list[dict] | None = None):
        if self.training:
            self.check_targets(targets, len(images))
            assert targets is not None  # check_targets raised otherwise
            if self.multiscale_train is not None:
                images, targets = self.multiscale_train(list(images), targets)
            batch = self.preprocess(images)
            device = batch.tensor.device
            targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()}
                       for t in targets]
            return self.forward_train(batch, targets)
        if self.test_time_aug is not None:
            results = self.test_time_aug(lambda views: self.forward_test(self.preprocess(views)),
                                         list(images))
        else:
            results = self.forward_test(self.preprocess(images))
        if targets is not None:
            results = [self.map_to_original(r, meta) for r, meta in zip(results, targets)]
        return results

    @staticmethod
    def map_to_original(result: dict, meta: dict) -> dict:
        if "boxes" in result:
            result = dict(result, boxes=boxes_to_original(result["boxes"], meta))
        return result

    def features(self, batch: ImageList) -> dict[str, Tensor]:
        """Backbone, then the neck when there is one (every detector holds ``backbone`` and
        ``neck`` attributes)."""
        backbone: nn.Module = self.backbone
        neck: nn.Module | None = getattr(self, "neck", None)
        feats = backbone(batch.tensor)
        return neck(feats) if neck is not None else feats

    def forward_train(self, batch: ImageList, targets: list[dict]) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward_test(self, batch: ImageList) -> list[dict]:
        raise NotImplementedError


def build_backbone_and_neck(cfg: dict, path: str) -> tuple[nn.Module, nn.Module | None, dict[str, ShapeSpec]]:
    """Build ``cfg['backbone']`` and optional ``cfg['neck']``; returns them and the output shapes."""
    if "backbone" not in cfg:
        raise ConfigError(f"{path}: missing 'backbone'")
    backbone = BACKBONES.build(cfg["backbone"], f"{path}.backbone")
    shapes = backbone.output_shape()
    neck = None
    if cfg.get("neck") is not None:
        neck = NECKS.build(cfg["neck"], f"{path}.neck", input_shapes=shapes)
        shapes = neck.output_shape()
    return backbone, neck, shapes


def build_with_head(cls, cfg: dict, path: str):
    """``cls(backbone=, neck=, head=, **detector kwargs)`` for a detector of one head that gets
    ``input_shapes`` and ``num_classes`` (Segmentor, DETRDetector)."""
    for key in ("num_classes", "head"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing '{key}'")
    backbone, neck, shapes = build_backbone_and_neck(cfg, path)
    head = HEADS.build(cfg["head"], f"{path}.head", input_shapes=shapes,
                       num_classes=int(cfg["num_classes"]))
    kwargs = base_kwargs(cfg, path, cls.__name__, ("backbone", "neck", "head", "num_classes"))
    return cls(backbone=backbone, neck=neck, head=head, **kwargs)


def base_kwargs(cfg: dict, path: str, owner: str, component_keys: Sequence[str]) -> dict:
    """The keys of a detector config that are not components, checked against ``Detector``."""
    rest = {k: v for k, v in cfg.items() if k not in component_keys}
    check_kwargs(Detector.__init__, rest, path, owner, also_valid=component_keys)
    return rest
