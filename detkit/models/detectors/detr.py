"""DETRDetector: backbone -> neck (hybrid encoder / projector) -> DETR decoder head, NMS-free.

The real-time DETR families (RT-DETR v1/v2, D-FINE) keep detkit's detector contract: images in,
``loss_*`` dict (training) or per-image ``boxes`` / ``scores`` / ``labels`` (evaluation) out. Only
two things differ from ``OneStageDetector``:

* the head's ``forward`` takes the training targets too, since contrastive denoising queries are
  built from the ground truth; they are given in the DETR format (``labels`` Int64[N], ``boxes``
  Float[N,4] cxcywh normalised to the padded batch), which :func:`to_detr_targets` produces;
* the defaults of the pixel statistics: the RT-DETR / D-FINE releases rescale to [0, 1] and do not
  normalise (their image processors have ``do_normalize: false``), so mean 0 and std 1.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ...registry import DETECTORS
from ...structures import ImageList
from ..detr.outputs import detr_targets_from_detkit
from .base import Detector, build_with_head

__all__ = ["DETRDetector"]


@DETECTORS.register()
class DETRDetector(Detector):
    """Composes parts only; the decoder, its losses and its top-k decoding live in the head.

    Config::

        model:
          type: DETRDetector
          num_classes: 80
          backbone: {type: HGNetv2, name: B0, out_features: [c3, c4, c5]}
          neck: {type: HybridEncoder, ...}
          head: {type: DFINEHead, ...}           # gets input_shapes and num_classes
          pixel_mean / pixel_std / size_divisibility   # optional, see Detector

    The head is called ``head(features, detr_targets)`` in training and ``head(features)`` at
    evaluation, then ``head.loss(outputs, targets, image_sizes)`` /
    ``head.predict(outputs, image_sizes)`` as every detkit head.
    """

    head: Any   # duck-typed as every detkit head (forward / loss / predict)

    def __init__(self, *, backbone: nn.Module, neck: nn.Module | None, head: nn.Module,
                 pixel_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 pixel_std: Sequence[float] = (1.0, 1.0, 1.0), **kwargs):
        super().__init__(pixel_mean=pixel_mean, pixel_std=pixel_std, **kwargs)
        self.backbone = backbone
        self.neck = neck
        self.head = head

    @classmethod
    def from_config(cls, cfg: dict, *, path: str) -> "DETRDetector":
        return build_with_head(cls, cfg, path)

    def forward_train(self, batch: ImageList, targets: list[dict]) -> dict[str, Tensor]:
        detr_targets = detr_targets_from_detkit(targets, batch.tensor.shape[-2:])
        outputs = self.head(self.features(batch), detr_targets)
        return self.head.loss(outputs, targets, batch.image_sizes)

    def forward_test(self, batch: ImageList) -> list[dict]:
        return self.head.predict(self.head(self.features(batch)), batch.image_sizes)
