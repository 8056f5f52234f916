"""MoCo v2 (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "Improved Baselines").

Query encoder (backbone + 2-layer MLP head, no BN) and a momentum key encoder; InfoNCE of each
query against its key and a queue of K earlier keys; the keys of every rank are enqueued.

Paper defaults kept: MLP head 2048-d hidden (here ``proj_hidden_dim``) to 128-d, temperature
0.2, queue 65536, momentum 0.999, one InfoNCE direction (view 1 queries, view 2 keys),
Shuffle BN across ranks (keys are encoded on a random permutation of the whole batch), the query
encoder transferred to detection.

Deviations: ``bn_splits`` > 1 encodes queries and (shuffled) keys in that many chunks per
process, so one process emulates Shuffle BN's per-GPU batch statistics (the MoCo authors' own
single-GPU demo does the same with split BatchNorm). The shapes config shortens the queue to
256 keys: on a 1000-image set a queue of about an epoch holds an older key of almost every
query's own image as a negative. It lowers the momentum to 0.99 for a run of a few hundred
steps. Feature std is logged on the queries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SSL_METHODS, SSLMethod
from .heads import MLP, Encoder, make_momentum_copy, momentum_update
from .losses import _world, gather_no_grad, info_nce, normalised_std

__all__ = ["MoCoV2", "enqueue"]


@torch.no_grad()
def enqueue(queue: Tensor, pointer: Tensor, keys: Tensor) -> None:
    """Write Float[N,D] ``keys`` into ``queue`` Float[K,D] at ``pointer`` (wrapping), oldest first out.

    ``pointer`` (Int64 scalar) moves on by N modulo K. With N > K only the last K keys are kept.
    """
    size = queue.shape[0]
    keys = keys[-size:]
    index = (pointer + torch.arange(len(keys), device=queue.device)) % size
    queue[index] = keys.to(queue.dtype)
    pointer.copy_((pointer + len(keys)) % size)


@SSL_METHODS.register()
class MoCoV2(SSLMethod):
    """Args: backbone (module), proj_hidden_dim, proj_dim, queue_size, temperature, momentum,
    bn_splits (chunks per process for the BN statistics; see the module docstring)."""

    export_prefix = "encoder_q.backbone."
    export_name = "query encoder"
    queue: Tensor        # Float[K,D] normalised keys, oldest at queue_ptr
    queue_ptr: Tensor    # Int64 scalar

    def __init__(self, *, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 queue_size: int = 65536, temperature: float = 0.2, momentum: float = 0.999,
                 bn_splits: int = 1, **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        if queue_size < 1 or bn_splits < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"MoCoV2: need queue_size >= 1, bn_splits >= 1, 0 <= momentum < 1; got "
                             f"{queue_size}, {bn_splits}, {momentum}")
        self.temperature, self.momentum, self.bn_splits = float(temperature), float(momentum), int(bn_splits)
        head = MLP(in_dim=self.feature_dim, hidden_dim=proj_hidden_dim, out_dim=proj_dim, hidden_bn=False)
        self.encoder_q = Encoder(backbone, head)
        self.encoder_k = make_momentum_copy(self.encoder_q)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _encode(self, encoder: nn.Module, x: Tensor) -> Tensor:
        chunks = x.chunk(min(self.bn_splits, len(x)))
        return torch.cat([encoder(c) for c in chunks])

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        """Shuffle BN: encode a random permutation of all ranks' key views, then undo it."""
        rank, world = _world()
        everyone = gather_no_grad(x)
        perm = torch.randperm(len(everyone), device=x.device)
        if world > 1:
            dist.broadcast(perm, src=0)
        mine = perm.view(world, -1)[rank]
        keys = gather_no_grad(self._encode(self.encoder_k, everyone[mine]))
        unshuffled = torch.empty_like(keys)
        unshuffled[perm] = keys
        return unshuffled.view(world, len(x), -1)[rank]

    def compute(self, global_views: list[Tensor], local_views: list[Tensor]) -> dict[str, Tensor]:
        q = self._encode(self.encoder_q, global_views[0])
        k = F.normalize(self._keys(global_views[1]), dim=1)
        loss = info_nce(F.normalize(q, dim=1), k, self.queue.clone(), self.temperature)
        enqueue(self.queue, self.queue_ptr, gather_no_grad(k))
        return {"loss_infonce": loss, "feature_std": normalised_std(q)}

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        momentum_update(self.encoder_q, self.encoder_k, self.momentum)
