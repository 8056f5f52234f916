"""The self-supervised objectives as pure functions, plus the cross-rank gathers they need.

Legend: B samples of this process, W processes (ranks), D embedding dimension, K queue length,
V views. Embeddings are Float[B,D]; "normalised" means unit L2 norm along D.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_with_grad", "gather_no_grad", "info_nce", "nt_xent", "negative_cosine",
           "byol_regression", "dino_cross_entropy", "normalised_std"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    (``all_reduce`` + slice instead of reduce-scatter: gloo has no reduce-scatter.)
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = _world()
        ctx.rank, ctx.size = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(x: Tensor) -> Tensor:
    """Float[B,...] of every rank concatenated in rank order -> Float[W*B,...], differentiable.

    Every rank must pass the same B. Without torch.distributed it returns ``x``.
    """
    return x if _world()[1] == 1 else _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_with_grad` but detached (MoCo keys, DINO centre statistics)."""
    if _world()[1] == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(_world()[1])]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: ``-log exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t))``, batch mean.

    q: Float[B,D] normalised queries; k: Float[B,D] normalised positive keys (no gradient);
    queue: Float[K,D] normalised negatives. Scalar.
    """
    positive = (q * k.detach()).sum(dim=1, keepdim=True)           # [B,1]
    negatives = q @ queue.detach().t()                              # [B,K]
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over the 2N views of the whole (all-rank) batch, mean over this rank's 2B anchors.

    z1, z2: Float[B,D] projections of the two views of this rank's B images (normalised here).
    With W ranks the negatives are the 2(WB - 1) other views of every rank, gathered with
    gradient, so W ranks of B give the loss (and, after DDP's averaging, the gradient) of one
    process with batch WB.
    """
    rank, _ = _world()
    local = F.normalize(torch.cat([z1, z2]), dim=1)                  # [2B,D]: view 1 then view 2
    everyone1 = gather_with_grad(F.normalize(z1, dim=1))             # [WB,D]
    everyone2 = gather_with_grad(F.normalize(z2, dim=1))
    candidates = torch.cat([everyone1, everyone2])                   # [2WB,D]
    b, n = len(z1), len(everyone1)
    logits = local @ candidates.t() / temperature                    # [2B,2WB]
    own = torch.arange(b, device=z1.device) + rank * b               # this rank's rows in everyone*
    self_index = torch.cat([own, own + n])
    partner = torch.cat([own + n, own])
    logits[torch.arange(2 * b, device=z1.device), self_index] = float("-inf")   # no self-pair
    return F.cross_entropy(logits, partner)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's ``D(p, stopgrad(z)) = -cos(p, z)``, batch mean; p, z: Float[B,D]."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def byol_regression(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)`` (z from the target net), batch mean."""
    return (2.0 - 2.0 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def dino_cross_entropy(student: list[Tensor], teacher: list[Tensor], center: Tensor,
                       student_temp: float, teacher_temp: float) -> Tensor:
    """DINO: mean over pairs (teacher global view i, student view v != i) of
    ``sum_d -softmax((t_i - c)/tau_t)_d * log_softmax(s_v/tau_s)_d``, batch mean.

    student: V tensors Float[B,D] (the global views first, in the teacher's order);
    teacher: Vg tensors Float[B,D]; center: Float[1,D]. Scalar.
    """
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=1) for s in student]
    total, pairs = student[0].new_zeros(()), 0
    for i, target in enumerate(targets):
        for v, log_p in enumerate(log_probs):
            if v == i:
                continue
            total = total + (-(target * log_p).sum(dim=1)).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def normalised_std(z: Tensor) -> Tensor:
    """Collapse watch: per-dimension std over the batch of L2-normalised ``z`` Float[B,D],
    averaged over D and scaled by sqrt(D): about 1 for spread-out features, 0 when collapsed
    (SimSiam section 4.1 uses the unscaled value, ~1/sqrt(D))."""
    if len(z) < 2:
        return z.new_zeros(())
    zn = F.normalize(z.float(), dim=1)
    return zn.std(dim=0).mean() * zn.shape[1] ** 0.5
