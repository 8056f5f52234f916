"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent") and SimSiam (Chen & He 2021).

No negatives. An online encoder (backbone + projector) with a predictor regresses the
projection of the other view made by a target network: BYOL's target is a momentum copy of the
online encoder (cosine momentum schedule), SimSiam's target is the online encoder itself under
stop-gradient. Both symmetrise the loss over the two views; the online encoder is transferred.

BYOL paper defaults kept: projector and predictor 2-layer MLPs with BN (4096 hidden, 256 out),
``2 - 2 cos`` summed over both directions, tau from 0.996 to 1 by the cosine schedule over the
run; LARS (``train.optimizer.type: LARS``, as in the shapes config). Deviation: the shapes config
uses 1024-d hidden layers.

SimSiam paper defaults kept: 3-layer projector with BN on every layer (the output BN without
affine), 2-layer bottleneck predictor (512 hidden), ``D(p1, sg(z2))/2 + D(p2, sg(z1))/2`` with
D = negative cosine. Deviation: the predictor follows the same lr schedule as the rest (the
paper keeps its lr fixed; it reports the decayed variant also works, slightly worse).

Feature std is logged on the online projections (SimSiam's collapse indicator).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import SSL_METHODS, SSLMethod
from .heads import MLP, Encoder, cosine_schedule, make_momentum_copy, momentum_update
from .losses import byol_regression, negative_cosine, normalised_std

__all__ = ["BYOL", "SimSiam"]


@SSL_METHODS.register()
class BYOL(SSLMethod):
    """Args: backbone, proj_hidden_dim, proj_dim, pred_hidden_dim, base_momentum (tau_base)."""

    export_prefix = "online.backbone."
    export_name = "online encoder"

    def __init__(self, *, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, base_momentum: float = 0.996, **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"BYOL: base_momentum must be in [0, 1], got {base_momentum}")
        self.base_momentum = float(base_momentum)
        self.online = Encoder(backbone, MLP(in_dim=self.feature_dim, hidden_dim=proj_hidden_dim,
                                            out_dim=proj_dim))
        self.predictor = MLP(in_dim=proj_dim, hidden_dim=pred_hidden_dim, out_dim=proj_dim)
        self.target = make_momentum_copy(self.online)

    def compute(self, global_views: list[Tensor], local_views: list[Tensor]) -> dict[str, Tensor]:
        x1, x2 = global_views[0], global_views[1]
        z1, z2 = self.online(x1), self.online(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        t1, t2 = self.target(x1).detach(), self.target(x2).detach()
        loss = byol_regression(p1, t2) + byol_regression(p2, t1)
        return {"loss_byol": loss, "feature_std": normalised_std(z1)}

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        tau = cosine_schedule(self.base_momentum, 1.0, step - 1, total_steps)
        momentum_update(self.online, self.target, tau)


@SSL_METHODS.register()
class SimSiam(SSLMethod):
    """Args: backbone, proj_dim (hidden = output width of the projector), pred_hidden_dim."""

    export_prefix = "encoder.backbone."
    export_name = "encoder"

    def __init__(self, *, backbone: nn.Module, proj_dim: int = 2048, pred_hidden_dim: int = 512, **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        self.encoder = Encoder(backbone, MLP(in_dim=self.feature_dim, hidden_dim=proj_dim, out_dim=proj_dim,
                                             num_layers=3, last_bn=True))
        self.predictor = MLP(in_dim=proj_dim, hidden_dim=pred_hidden_dim, out_dim=proj_dim)

    def compute(self, global_views: list[Tensor], local_views: list[Tensor]) -> dict[str, Tensor]:
        z1, z2 = self.encoder(global_views[0]), self.encoder(global_views[1])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
        return {"loss_simsiam": loss, "feature_std": normalised_std(z1)}
