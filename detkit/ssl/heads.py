"""Projection / prediction heads of the self-supervised methods, and momentum-encoder helpers.

Shapes: Float[B,C] pooled backbone features in, Float[B,D] embeddings out.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "DINOHead", "Encoder", "pooled_features", "make_momentum_copy", "momentum_update",
           "cosine_schedule"]


def pooled_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """A backbone's image representation, Float[B,3,H,W] -> Float[B,C].

    The hook: a backbone with a ``final_tokens(x) -> (Float[B,C] pooled, Float[B,N,C] patches)``
    method is pooled by it (detkit's ViT: the CLS token after the last block and the final norm,
    as DINO / DINOv2 pre-train ViTs); any other backbone by the global average of its last output
    (the CNNs' ``c5``).
    """
    final_tokens = getattr(backbone, "final_tokens", None)
    if callable(final_tokens):
        return final_tokens(x)[0]
    out = backbone(x)
    last = out[list(out)[-1]] if isinstance(out, dict) else out
    return last.mean(dim=(2, 3))


class MLP(nn.Sequential):
    """``num_layers`` Linear layers; between them BatchNorm1d + ReLU.

    ``last_bn``: BatchNorm1d (no affine) after the last layer as well (SimCLR v2 / SimSiam).
    ``num_layers=2, last_bn=False``: MoCo v2 (no BN), BYOL (with BN in the hidden layer).
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 hidden_bn: bool = True, last_bn: bool = False):
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not (last and last_bn) and
                                    not (hidden_bn and not last)))
            if not last:
                if hidden_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
            elif last_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
        super().__init__(*layers)


class DINOHead(nn.Module):
    """DINO's head: 3-layer MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised linear.

    Float[B,C] -> Float[B,out_dim] logits (before the temperature). The last layer's norm
    (``weight_g``) is fixed at 1, as in the paper.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 out_dim: int = 65536, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # Direction (``weight``) learnt, row norm fixed at 1: torch.nn.utils.weight_norm with g = 1.
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_weight, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return x @ F.normalize(self.last_weight, dim=1).t()


class Encoder(nn.Module):
    """backbone -> pooled (:func:`pooled_features`: CLS token or global average) -> head;
    Float[B,3,H,W] -> Float[B,D].

    ``features(x)`` returns the pooled backbone output Float[B,C] (what k-NN / linear probes use).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x: Tensor) -> Tensor:
        return pooled_features(self.backbone, x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A gradient-free deep copy (the momentum / teacher network starts equal to the online one)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``target = m * target + (1 - m) * online`` for every parameter (MoCo / BYOL / DINO).

    Buffers (BN running statistics) are left alone: the target runs in train mode and keeps
    its own statistics, as in the reference implementations.
    """
    t_params: list[Tensor] = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError(f"momentum_update: {len(o_params)} online vs {len(t_params)} target parameters")
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)


def cosine_schedule(base: float, final: float, step: int, total: int) -> float:
    """``final - (final - base) * (cos(pi * step / total) + 1) / 2`` (BYOL's tau schedule)."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
