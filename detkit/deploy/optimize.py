"""Free speed-ups of the PyTorch inference path: BatchNorm folding (and channels_last / compile,
applied by ``Predictor``; see ``tools/benchmarks/deploy.py`` for what each is worth).

Folding: an eval-mode ``BatchNorm2d`` / ``FrozenBatchNorm2d`` right after a ``Conv2d`` is the
affine map ``y = x * s + t`` with ``s = weight / sqrt(running_var + eps)`` and
``t = bias - running_mean * s``; it is merged into the conv (``W' = W * s``, ``b' = b * s + t``)
and replaced by ``nn.Identity``. Pairs are found where detkit's modules put them: consecutive
children of an ``nn.Sequential`` (``ConvNormAct``, ResNet's ``downsample``, heads' towers) and
the ``convN`` / ``bnN`` attributes of torchvision's ResNet blocks and stem, whose ``forward``
applies ``bnN`` directly to ``convN``'s output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.layers.frozen_bn import FrozenBatchNorm2d

__all__ = ["fold_batchnorm", "apply_inference_options"]

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fold(conv: nn.Conv2d, norm: Any) -> None:
    with torch.no_grad():
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv name, norm name) child pairs of ``module`` whose norm directly follows the conv."""
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:])
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], _NORMS)]
    pairs = []
    for name, child in children.items():
        partner = "bn" + name[len("conv"):] if name.startswith("conv") and name[4:].isdigit() else None
        if partner and isinstance(child, nn.Conv2d) and isinstance(children.get(partner), _NORMS):
            pairs.append((name, partner))
    return pairs


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode norm that directly follows a conv into it (in place); returns how
    many were folded. The model must be in eval mode (training BN uses batch statistics)."""
    if model.training:
        raise ValueError("fold_batchnorm: call model.eval() first (training BatchNorm uses the "
                         "statistics of each batch, which cannot be folded)")
    folded = 0
    for module in list(model.modules()):
        for conv_name, norm_name in _pairs(module):
            _fold(getattr(module, conv_name), getattr(module, norm_name))
            setattr(module, norm_name, nn.Identity())
            folded += 1
    return folded


def apply_inference_options(model: nn.Module, *, fold_bn: bool = False, channels_last: bool = False,
                            compile: bool = False) -> nn.Module:
    """``Predictor``'s PyTorch speed options on an eval-mode detector (in place; returned).

    ``fold_bn``: :func:`fold_batchnorm`. ``channels_last``: NHWC weights, so CPU convolutions run
    in the NHWC layout oneDNN prefers. ``compile``: ``torch.compile`` of the backbone and neck
    (the dense part; heads with data-dependent shapes stay eager).
    """
    if fold_bn:
        fold_batchnorm(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        for name in ("backbone", "neck"):
            part = getattr(model, name, None)
            if part is not None:
                setattr(model, name, torch.compile(part, dynamic=True))
    return model
