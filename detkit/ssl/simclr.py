"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

One encoder (backbone + MLP projection head) run once on both views of the batch (Float[2B,...],
so BatchNorm sees 2B images, as in the reference); NT-Xent over the two views of every image, the
other 2N - 2 views of the whole batch as negatives. Across ranks the projections are gathered
*with gradient* (:func:`~detkit.ssl.losses.nt_xent`), so W processes of batch B train like one
process of batch WB.

Paper defaults kept: 2-layer projection head with BN to 128-d, cosine similarity with
temperature (``temperature`` 0.5 as in the paper's base setting; 0.1-0.2 suits small batches).
The paper's LARS optimizer is ``train.optimizer.type: LARS`` (:mod:`detkit.engine.lars`; the
shapes config uses it). Deviations: any trainer optimizer may be chosen instead (SGD drifted the
stem to colour-averaging kernels in short runs, README "Self-supervised pre-training"); global BN
across GPUs is ``train.sync_bn: true`` (CUDA only; on CPU BN stays per process).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SSL_METHODS, SSLMethod
from .heads import MLP, Encoder
from .losses import normalised_std, nt_xent

__all__ = ["SimCLR"]


@SSL_METHODS.register()
class SimCLR(SSLMethod):
    """Args: backbone, proj_hidden_dim, proj_dim, temperature."""

    export_prefix = "encoder.backbone."
    export_name = "encoder"

    def __init__(self, *, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.5, **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        self.temperature = float(temperature)
        self.encoder = Encoder(backbone, MLP(in_dim=self.feature_dim, hidden_dim=proj_hidden_dim,
                                             out_dim=proj_dim))

    def compute(self, global_views: list[Tensor], local_views: list[Tensor]) -> dict[str, Tensor]:
        # Both views in one pass, as the reference does: BatchNorm statistics over all 2B images.
        z1, z2 = self.encoder(torch.cat(global_views[:2])).chunk(2)
        return {"loss_nt_xent": nt_xent(z1, z2, self.temperature), "feature_std": normalised_std(z1)}
