"""Semantic segmentation heads: Panoptic-FPN's semantic branch and DeepLabV3's ASPP head.

Legend: B images, K classes (mask values, background included), Hf x Wf the head's output
grid at stride ``output_stride``, Hp x Wp the padded batch (Hf * stride), Hi x Wi one image.

Both heads share the same contract (``SemSegHead``): ``forward`` -> logits Float[B,K,Hf,Wf];
``loss`` upsamples them (bilinear) to the padded batch size and applies cross-entropy against
``target['sem_seg']`` Int64[Hi,Wi] (``ignore_index`` pixels and the padding excluded);
``predict`` -> ``{"sem_seg": Int64[Hi,Wi]}`` per image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import HEADS
from ...structures import ShapeSpec
from ..layers.aspp import ASPP
from ..layers.conv import ConvNormAct

__all__ = ["SemSegHead", "SemanticHead", "DeepLabV3Head"]


class SemSegHead(nn.Module):
    """Loss and prediction shared by the semantic heads; subclasses define ``forward``."""

    def __init__(self, *, num_classes: int, output_stride: int, ignore_index: int = 255,
                 loss_weight: float = 1.0):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must count every mask value incl. background (>= 2), "
                             f"got {num_classes}")
        self.num_classes = int(num_classes)
        self.output_stride = int(output_stride)
        self.ignore_index = int(ignore_index)
        self.loss_weight = float(loss_weight)

    def upsample(self, logits: Tensor) -> Tensor:
        """Float[B,K,Hf,Wf] -> Float[B,K,Hp,Wp] (bilinear, the padded input resolution)."""
        size = (logits.shape[-2] * self.output_stride, logits.shape[-1] * self.output_stride)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(self, outputs: Tensor, targets: list[dict], image_sizes: Sequence[tuple[int, int]]
             ) -> dict[str, Tensor]:
        """Pixel-averaged cross-entropy over labelled pixels: ``{"loss_sem_seg": scalar}``."""
        logits = self.upsample(outputs)
        gt = torch.full((logits.shape[0], *logits.shape[-2:]), self.ignore_index, dtype=torch.int64,
                        device=logits.device)
        for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
            if "sem_seg" not in t:
                raise ValueError(f"target {i} (image_id {t.get('image_id')}): a segmentation head "
                                 f"needs 'sem_seg' masks (is the dataset a segmentation dataset?)")
            mask = t["sem_seg"]
            if tuple(mask.shape[-2:]) != (h, w):
                raise ValueError(f"target {i} (image_id {t.get('image_id')}): sem_seg is "
                                 f"{tuple(mask.shape[-2:])} but the image is {(h, w)}")
            gt[i, :h, :w] = mask
        # sum / count instead of reduction='mean': a batch with only ignored pixels gives 0, not NaN
        valid = (gt != self.ignore_index).sum().clamp(min=1)
        ce = F.cross_entropy(logits.float(), gt, ignore_index=self.ignore_index, reduction="sum")
        return {"loss_sem_seg": ce / valid * self.loss_weight}

    def image_logits(self, outputs: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per image Float[K,Hi,Wi]: upsampled logits with the padding cut off."""
        full = self.upsample(outputs)
        return [full[i, :, :h, :w] for i, (h, w) in enumerate(image_sizes)]

    def predict(self, outputs: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """``[{"sem_seg": Int64[Hi,Wi]}]``: the argmax class of every pixel of each image."""
        return [{"sem_seg": logits.argmax(0)} for logits in self.image_logits(outputs, image_sizes)]


@HEADS.register()
class SemanticHead(SemSegHead):
    """Panoptic FPN semantic branch (Kirillov et al. 2019), on FPN outputs ``p2..p5``.

    Each level goes through ``log2(stride / 4)`` blocks of [3x3 conv -> norm -> ReLU -> 2x
    bilinear upsample] (one block without upsampling for the finest level), the levels are
    summed at the finest stride and a 1x1 conv predicts K logits.

    Args:
        input_shapes: neck output shapes. num_classes: K (mask values incl. background).
        in_features: FPN levels to use. channels: width of the branch (128 in the paper).
        norm: norm of the branch convs (``GN`` in the paper).
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int,
                 in_features: Sequence[str] = ("p2", "p3", "p4", "p5"), channels: int = 128,
                 norm: str | None = "GN", ignore_index: int = 255, loss_weight: float = 1.0):
        missing = [f for f in in_features if f not in input_shapes]
        if missing or not in_features:
            raise ValueError(f"SemanticHead: in_features {list(in_features)} not all in the neck "
                             f"outputs {list(input_shapes)}")
        self.in_features = sorted(in_features, key=lambda f: input_shapes[f].stride)
        finest = input_shapes[self.in_features[0]].stride
        super().__init__(num_classes=num_classes, output_stride=finest, ignore_index=ignore_index,
                         loss_weight=loss_weight)
        self.branches = nn.ModuleList()
        for name in self.in_features:
            ratio = input_shapes[name].stride // finest
            if ratio * finest != input_shapes[name].stride or ratio & (ratio - 1):
                raise ValueError(f"SemanticHead: stride of {name} ({input_shapes[name].stride}) is "
                                 f"not a power-of-two multiple of {finest}")
            num_up = int(math.log2(ratio))
            layers: list[nn.Module] = []
            for k in range(max(num_up, 1)):
                in_ch = input_shapes[name].channels if k == 0 else channels
                layers.append(ConvNormAct(in_ch, channels, 3, norm=norm, act="relu"))
                if num_up:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.branches.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(channels, self.num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        assert self.predictor.bias is not None  # nn.Conv2d's default bias=True
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """{pK: Float[B,C,H_K,W_K]} -> logits Float[B,K,Hf,Wf] at the finest level's stride."""
        x = None
        for name, branch in zip(self.in_features, self.branches):
            y = branch(features[name])
            if x is not None and y.shape[-2:] != x.shape[-2:]:  # odd sizes: align to the finest map
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        return self.predictor(x)


@HEADS.register()
class DeepLabV3Head(SemSegHead):
    """DeepLabV3 (Chen et al. 2017): ASPP -> 3x3 conv -> dropout -> 1x1 classifier.

    Meant for a dilated ResNet (``output_stride`` 8 or 16): ``rates`` default to (12, 24, 36) at
    stride 8 and (6, 12, 18) otherwise, scaled as in the paper.

    Args:
        in_feature: backbone output to use (``c5``). channels: ASPP / head width.
        norm: norm of every conv (``BN``; ``GN`` for batch size 1).
    """

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int, in_feature: str = "c5",
                 channels: int = 256, rates: Sequence[int] | None = None, norm: str | None = "BN",
                 dropout: float = 0.1, ignore_index: int = 255, loss_weight: float = 1.0):
        if in_feature not in input_shapes:
            raise ValueError(f"DeepLabV3Head: in_feature '{in_feature}' not in the inputs "
                             f"{list(input_shapes)}")
        shape = input_shapes[in_feature]
        super().__init__(num_classes=num_classes, output_stride=shape.stride, ignore_index=ignore_index,
                         loss_weight=loss_weight)
        self.in_feature = in_feature
        if rates is None:
            rates = (12, 24, 36) if shape.stride <= 8 else (6, 12, 18)
        self.aspp = ASPP(shape.channels, channels, rates=tuple(rates), norm=norm, dropout=0.0)
        self.conv = ConvNormAct(channels, channels, 3, norm=norm, act="relu")
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        assert self.classifier.bias is not None  # nn.Conv2d's default bias=True
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """{in_feature: Float[B,C,Hf,Wf]} -> logits Float[B,K,Hf,Wf]."""
        return self.classifier(self.dropout(self.conv(self.aspp(features[self.in_feature]))))
