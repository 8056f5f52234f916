"""Exponential moving average of model weights (used for evaluation and saved in checkpoints)."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """``ema = d * ema + (1 - d) * weights`` after every optimizer step; buffers are copied.

    ``d = decay * (1 - exp(-updates / tau))`` ramps up from 0 so that early, poor weights fade
    fast (with ``tau = 0`` the decay is constant). Floating parameters are averaged; integer
    buffers (BN's ``num_batches_tracked``) and floating buffers (BN running statistics, which
    are already averages) are copied as they are.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9998, tau: float = 2000.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = 0

    def current_decay(self) -> float:
        if self.tau <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        ema_params = dict(self.module.named_parameters())
        src_params = dict(model.named_parameters())
        ema_list: list[Tensor] = [ema_params[n] for n in src_params
                                  if ema_params[n].dtype.is_floating_point]
        src_list = [src_params[n].detach() for n in src_params
                    if ema_params[n].dtype.is_floating_point]
        if ema_list:
            torch._foreach_lerp_(ema_list, src_list, 1.0 - d)
        for ema_buf, src in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(src)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)
