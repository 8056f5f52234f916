"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels: a student (backbone + DINO head) matches, by cross-entropy,
the sharpened and centred output of a momentum teacher. The teacher sees the global views only;
the student sees every view (multi-crop: 2 global + Vl local views), and each (teacher view,
different student view) pair is one term. The centre is an EMA of the teacher's batch mean
(all ranks); the teacher, as in the paper, is transferred. As the reference's multi-crop wrapper,
the views of one resolution are encoded in one pass (3 backbone passes per step: student globals,
student locals, teacher globals; BatchNorm statistics over all views of a size).

ViT backbones (detkit's ``ViT``): the pooled representation is the CLS token after the last block
and the final norm (the ``final_tokens`` hook, :func:`~detkit.ssl.heads.pooled_features`), as in
DINO / DINOv2; the position embeddings are interpolated to each view's patch grid, so global and
local views of different sizes go through one ViT. View sizes must be multiples of the patch (times
the windows per side when windowed). DINOv2's iBOT masked-patch loss is not implemented.

Paper defaults kept: head 3-layer MLP (2048 hidden) -> 256 bottleneck -> L2 norm ->
weight-normalised linear with g fixed to 1; student temperature 0.1, teacher 0.04 (optional
linear warm-up from ``warmup_teacher_temp`` over ``warmup_fraction`` of the run), centre
momentum 0.9, teacher momentum 0.996 -> 1 (cosine).

Weight decay: the ViT recipe's cosine schedule from 0.04 to 0.4 (AdamW) is
``train.scheduler.weight_decay_end`` (:mod:`detkit.engine.optim`); DINO's own ResNet-50 recipe
keeps SGD's 1e-4 constant, as the shapes config does.

Deviations: the shapes config uses out_dim 4096 (not 65536) for a 1000-image set; the last
layer is not frozen during the first epoch and there is no gradient clipping by default
(``train.clip_grad`` does the latter).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SSL_METHODS, SSLMethod
from .heads import DINOHead, Encoder, cosine_schedule, make_momentum_copy, momentum_update
from .losses import dino_cross_entropy, gather_no_grad, normalised_std

__all__ = ["DINO", "encode_by_resolution"]


def encode_by_resolution(encoder: nn.Module, views: list[Tensor]) -> list[Tensor]:
    """``encoder`` over V views Float[B,3,S,S] of one size in one pass (Float[V*B,3,S,S]), as
    DINO's multi-crop wrapper does: BatchNorm statistics over all V*B crops, one backbone call per
    resolution. Returns the V embeddings Float[B,D] in view order; ``[]`` for no views."""
    if not views:
        return []
    if any(v.shape != views[0].shape for v in views):
        raise ValueError(f"encode_by_resolution: views of one group must share a shape, got "
                         f"{sorted({tuple(v.shape) for v in views})}")
    return list(encoder(torch.cat(views)).chunk(len(views)))


@SSL_METHODS.register()
class DINO(SSLMethod):
    """Args: backbone, hidden_dim, bottleneck_dim, out_dim, student_temp, teacher_temp,
    warmup_teacher_temp (None: no warm-up), warmup_fraction, center_momentum, base_momentum."""

    export_prefix = "teacher.backbone."
    export_name = "teacher"
    min_global_views = 1
    center: Tensor       # Float[1,D]
    progress: Tensor     # Float scalar

    def __init__(self, *, backbone: nn.Module, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 out_dim: int = 65536, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float | None = None, warmup_fraction: float = 0.1,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp = None if warmup_teacher_temp is None else float(warmup_teacher_temp)
        self.warmup_fraction = float(warmup_fraction)
        self.center_momentum, self.base_momentum = float(center_momentum), float(base_momentum)
        head = DINOHead(in_dim=self.feature_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                        out_dim=out_dim)
        self.student = Encoder(backbone, head)
        self.teacher = make_momentum_copy(self.student)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("progress", torch.zeros(()))   # finished fraction of the run (resumed)

    def current_teacher_temp(self) -> float:
        start = self.warmup_teacher_temp
        if start is None or self.warmup_fraction <= 0:
            return self.teacher_temp
        t = min(float(self.progress) / self.warmup_fraction, 1.0)
        return start + t * (self.teacher_temp - start)

    def check_view_sizes(self, views: list[Tensor]) -> None:
        """A ViT cuts views into patches (and windows): sizes it does not divide would silently lose
        pixels, so they are an error naming the multiple (``size_divisibility``: patch x windows)."""
        unit = int(getattr(self.student.backbone, "size_divisibility", 1) or 1)
        bad = sorted({tuple(v.shape[-2:]) for v in views if v.shape[-2] % unit or v.shape[-1] % unit})
        if bad:
            raise ValueError(f"DINO: views of size {bad} do not fit the {self.backbone_type} backbone; "
                             f"make every view group's size a multiple of {unit} (patch x windows per side)")

    def compute(self, global_views: list[Tensor], local_views: list[Tensor]) -> dict[str, Tensor]:
        self.check_view_sizes(global_views + local_views)
        student = (encode_by_resolution(self.student, global_views)
                   + encode_by_resolution(self.student, local_views))
        with torch.no_grad():
            teacher = encode_by_resolution(self.teacher, global_views)
        loss = dino_cross_entropy(student, teacher, self.center, self.student_temp,
                                  self.current_teacher_temp())
        self._update_center(torch.cat(teacher))
        return {"loss_dino": loss, "feature_std": normalised_std(student[0].detach())}

    @torch.no_grad()
    def _update_center(self, teacher_out: Tensor) -> None:
        batch_center = gather_no_grad(teacher_out.float()).mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        momentum_update(self.student, self.teacher, cosine_schedule(self.base_momentum, 1.0, step - 1,
                                                                    total_steps))
        self.progress.fill_(step / max(total_steps, 1))
