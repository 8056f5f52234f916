"""The model summary printed when training starts: parameters and GFLOPs at the training size.

GFLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of one
training image in eval mode (no gradient): a multiply-add counts 2 FLOPs, as the GFLOPs that
Ultralytics prints; only matrix products and convolutions are counted, so NMS, RoIAlign and
other gathers add nothing. A forward that fails (an odd model) gives "GFLOPs n/a", never an error.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
from torch import nn

__all__ = ["count_parameters", "count_flops", "model_summary"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts; a parameter shared by two modules counts once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_flops(model: nn.Module, forward: Callable[[], object]) -> int | None:
    """FLOPs of ``forward()`` (which calls ``model``) in eval mode; None when it fails.

    The model's train/eval flags are restored afterwards; no gradient is recorded.
    """
    from torch.utils.flop_counter import FlopCounterMode

    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        # some forwards warn (e.g. an empty prediction); the summary is no place for that
        with torch.no_grad(), counter, contextlib.redirect_stderr(io.StringIO()):
            forward()
    except Exception:  # noqa: BLE001 - the summary is informative only
        return None
    finally:
        for m, training in modes.items():
            m.training = training
    return int(counter.get_total_flops())


def model_summary(name: str, model: nn.Module, forward: Callable[[], object] | None,
                  size: tuple[int, ...] | None, *, what: str = "") -> str:
    """``model: YOLOv3 8,675,138 parameters (8,675,138 trainable), 12.9 GFLOPs at 3x416x416``;
    ``what`` names the part ``forward`` runs when it is not the whole model."""
    total, trainable = count_parameters(model)
    text = f"model: {name} {total:,} parameters ({trainable:,} trainable)"
    flops = count_flops(model, forward) if forward is not None else None
    where = f" at {'x'.join(map(str, size))}" if size else ""
    if flops is None:
        return text + ", GFLOPs n/a"
    return text + f", {flops / 1e9:.3g} GFLOPs{' of ' + what if what else ''}{where}"
