"""Shared benchmark helpers: timing, parameter / FLOP counts, markdown tables."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _deform_conv_flops(x_shape, w_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None,
                       **kwargs):
    # torchvision's deformable conv: counted as the dense conv it generalises (the bilinear
    # sampling of offsets is not included).
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def _custom_flops() -> dict:
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)

        return {torch.ops.torchvision.deform_conv2d: _deform_conv_flops}
    except (ImportError, AttributeError):
        return {}


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply and add counted separately: 2 per MAC) of one ``fn()`` call."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        fn()
    return counter.get_total_flops()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
