"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"): SGD with momentum
whose step for every weight tensor is scaled by a layer-wise trust ratio.

The optimizer of SimCLR and BYOL (and of MoCo v3 / DINO for ResNets). For each parameter ``w``
with gradient ``g`` in a group with learning rate ``lr``, weight decay ``wd``, momentum ``m``::

    u = g + wd * w
    if w is adapted:  u = u * (eta * ||w|| / ||u||)      (1 where ||w|| or ||u|| is 0)
    buf = m * buf + u;   w = w - lr * buf                  (torch's SGD momentum form)

so every adapted tensor moves by about ``lr * eta`` of its own norm per step, whatever the size of
its gradient: a layer with large gradients (the stem of a network pre-trained on views that differ
in colour) cannot outrun the others. As in SimCLR and BYOL, tensors of one dimension (biases, norm
layers' affine parameters) are not adapted (``exclude_1d: true``); the trainer's
:func:`~detkit.engine.optim.param_groups` gives them ``weight_decay_norm`` / ``weight_decay_bias``
(0 by default), which matches the papers' exclusion from weight decay.

Config: ``{type: LARS, lr: 0.3, momentum: 0.9, weight_decay: 1.0e-6, eta: 0.001}``.
"""

from __future__ import annotations

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, exclude_1d: bool = True):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: need lr > 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "eta": eta, "exclude_1d": exclude_1d})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                wd = group["weight_decay"]
                update = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if not (group["exclude_1d"] and p.ndim <= 1):
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
