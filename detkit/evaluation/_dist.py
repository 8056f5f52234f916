"""Minimal DDP helpers for evaluators: every rank ends with the same result, none hangs.

Kept private to the evaluation package (``import_all`` skips ``_``-prefixed modules) so that
evaluators work without the engine, e.g. from ``tools/eval.py`` or a user's own loop.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def collective_device() -> torch.device:
    """The device collectives of the default group need (CUDA for NCCL, else CPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without DDP)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_per_image(shards: list[dict]) -> dict:
    """Merge ``{image_id: payload}`` dicts from all ranks, keeping the first copy of an image.

    ``DistributedSampler`` pads the last batch by repeating images on some ranks, so an image id
    can arrive twice; counting it twice would bias the metrics.
    """
    merged: dict = {}
    for shard in shards:
        for image_id, payload in shard.items():
            merged.setdefault(image_id, payload)
    return merged


def compute_on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result (or its error) to every rank.

    An exception on rank 0 is re-raised on every rank instead of leaving the others waiting in
    the broadcast forever.
    """
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            box[0] = ("error", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"evaluation failed on rank 0: {value}")
    return value
