"""The base class of the self-supervised methods and their registry.

A method is an ``nn.Module`` the detection trainer can drive unchanged: called as
``method(images, targets)`` with ``images`` a list of B tensors Float[Vg,3,S,S] (the Vg global
views of each image, RGB in [0,1]) and ``targets`` a list of B dicts, optionally holding
``local_views`` Float[Vl,3,s,s] (multi-crop); it returns ``loss_*`` terms plus detached
scalars for the log (``feature_std``: collapse watch, see :func:`~detkit.ssl.losses.normalised_std`).
After every optimizer step the trainer calls ``after_optimizer_step(step, total_steps)``
(momentum encoders, DINO's schedules).

``export_prefix`` names the state-dict prefix of the backbone a detector fine-tunes from (the
online, momentum or teacher encoder, per the method's paper); ``checkpoint_meta()`` is stored
in the pre-training checkpoint so ``model.backbone.weights`` can find it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..models.detectors.base import IMAGENET_MEAN, IMAGENET_STD
from ..registry import BACKBONES, ConfigError, Registry, construct
from .heads import pooled_features

__all__ = ["SSL_METHODS", "SSLMethod", "build_method"]

SSL_METHODS = Registry("self-supervised method")


class SSLMethod(nn.Module):
    """Base: view stacking and normalisation, backbone building, the checkpoint description.

    Subclasses implement ``compute(global_views, local_views) -> dict`` on lists of normalised
    Float[B,3,S,S] tensors and set ``export_prefix`` / ``export_name``.
    """

    export_prefix = ""
    export_name = ""
    min_global_views = 2  # views of the largest size per image (DINO: 1, with local views)
    pixel_mean: Tensor   # Float[1,3,1,1]
    pixel_std: Tensor

    def __init__(self, *, backbone: nn.Module, pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.backbone_type = type(backbone).__name__
        # every detkit backbone has output_shape(); nn.Module does not declare it
        shapes = backbone.output_shape()  # type: ignore[operator]
        self.feature_dim = int(shapes[list(shapes)[-1]].channels)
        # Same normalisation as the detectors (detkit.models.detectors.base), so the fine-tuned
        # backbone sees inputs distributed as during pre-training.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg: dict, *, path: str):
        cfg = dict(cfg)
        if "backbone" not in cfg:
            raise ConfigError(f"{path}: '{cls.__name__}' needs a 'backbone' ({{type: ResNet, ...}})")
        cfg["backbone"] = BACKBONES.build(cfg["backbone"], f"{path}.backbone")
        return construct(cls, cfg, path, cls.__name__)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std

    def split_views(self, images: Sequence[Tensor], targets: Sequence[dict] | None
                    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per-sample view stacks -> (Vg global, Vl local) lists of normalised Float[B,3,S,S]."""
        if len(images) == 0 or any(im.dim() != 4 or im.shape[1] != 3 for im in images):
            shapes = sorted({tuple(im.shape) for im in images})
            raise ValueError(f"{type(self).__name__}: expected per-image view stacks Float[V,3,S,S] "
                             f"(a MultiViewDataset), got shapes {shapes[:3]}")
        global_views = self._normalise(torch.stack(list(images), dim=1))     # [Vg,B,3,S,S]
        local = [t["local_views"] for t in targets or [] if t.get("local_views") is not None]
        local_views = self._normalise(torch.stack(local, dim=1)) if local else None
        return list(global_views), (list(local_views) if local_views is not None else [])

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict] | None = None) -> dict[str, Tensor]:
        global_views, local_views = self.split_views(images, targets)
        if len(global_views) < self.min_global_views or len(global_views) + len(local_views) < 2:
            raise ValueError(f"{type(self).__name__}: needs {self.min_global_views} or more global views "
                             f"(views of the largest size) and two or more views in all per image, got "
                             f"{len(global_views)} + {len(local_views)} local; raise count in the views")
        return self.compute(global_views, local_views)

    def compute(self, global_views: list[Tensor], local_views: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer after optimizer step ``step`` (1-based) of ``total_steps``."""

    def exported_backbone(self) -> nn.Module:
        """The backbone a detector fine-tunes from (the module under ``export_prefix``)."""
        module: nn.Module = self
        for name in self.export_prefix.rstrip(".").split("."):
            module = getattr(module, name)
        return module

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Pooled features of the exported backbone (:func:`~detkit.ssl.heads.pooled_features`:
        the ViT's CLS token, a CNN's global average): Float[B,3,H,W] in [0,1] -> Float[B,C]."""
        return pooled_features(self.exported_backbone(), self._normalise(images))

    def checkpoint_meta(self) -> dict:
        return {"method": type(self).__name__, "backbone_type": self.backbone_type,
                "backbone_prefix": self.export_prefix, "backbone_from": self.export_name}


def build_method(cfg: dict, path: str = "model") -> SSLMethod:
    """A registered method from the ``model`` section of a pre-training config."""
    method = SSL_METHODS.build(cfg, path)
    if not isinstance(method, SSLMethod):
        raise ConfigError(f"{path}.type: '{cfg.get('type')}' is not a self-supervised method")
    return method
