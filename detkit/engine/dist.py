"""torchrun-aware process-group setup and the few collectives the trainer needs.

detkit writes no launcher: ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` and :func:`init_distributed` reads them. Without them (plain
``python tools/train.py``) everything runs as a single process and every collective here is a
no-op, so the trainer has one code path.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "get_rank", "get_world_size",
           "is_main_process", "barrier", "all_reduce_tensor", "all_gather_object", "broadcast_object",
           "broadcast_buffers"]


class DistInfo:
    """Rank, world size, local rank and the device this process trains on."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"DistInfo(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, device={self.device})")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer "
                           f"(it is normally set by torchrun)") from None


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes; single process when not launched by torchrun.

    Backend: NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
    Calling it again in a process that already joined returns the same information.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                               f"devices are visible; use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=timeout_minutes)}
        if use_cuda:
            kwargs["device_id"] = device  # binds NCCL to this GPU up front (no guessing at barrier)
        dist.init_process_group(**kwargs)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tensor(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``tensor`` (``sum``/``mean``/``max``) over all ranks, on its own device."""
    if get_world_size() == 1:
        return tensor.clone()
    buf = tensor.detach().to(_collective_device(), copy=True)
    if op == "max":
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    else:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if op == "mean":
            buf /= get_world_size()
    return buf.to(tensor.device)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without DDP)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step every
    rank holds its own statistics; evaluation and checkpoints need one consistent model.
    """
    if get_world_size() == 1:
        return
    device = _collective_device()
    for buf in module.buffers():
        tmp = buf.to(device)
        dist.broadcast(tmp, src=src)
        buf.copy_(tmp)
