"""torchrun-aware process-group setup and the few collectives the trainer needs.

detkit writes no launcher: ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` and :func:`init_distributed` reads them. Without them (plain
``python tools/train.py``) everything runs as a single process and every collective here is a
no-op, so the trainer has one code path.

Restarts (``torchrun --max-restarts``): torchrun's agent serves one TCPStore at
``MASTER_ADDR:MASTER_PORT`` for the whole job and keeps it, with every key the workers wrote,
across restarts. ``init_process_group`` names its keys the same way in every process
(``default_pg/0//cpu//0/<rank>`` holds a gloo rank's listening address, the NCCL unique id lives
beside it), so a restarted rank can read the address a killed peer published and dial a dead port
(``Connection refused``, or a gloo connect that retries until the 30-minute timeout). The store
namespace of a restart count is not a fix on several nodes: each node's agent counts its own
restarts (pytorch#135712). :func:`init_distributed` therefore puts the process group under a
prefix that rank 0 draws afresh and hands to every rank that asked for it after it started
(:func:`_agree_on_prefix`), and retries the join with backoff for ``init_timeout_minutes``.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import uuid
import warnings
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "get_rank", "get_world_size",
           "is_main_process", "barrier", "all_reduce_tensor", "all_gather_object", "broadcast_object",
           "broadcast_buffers"]

_JOIN = "detkit/join/"  # the handshake's keys in torchrun's store
_MAX_BACKOFF_S = 30.0


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


def init_distributed(timeout_minutes: float = 30.0, init_timeout_minutes: float = 5.0) -> DistInfo:
    """Join the process group torchrun describes; single process when not launched by torchrun.

    Backend: NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
    ``timeout_minutes``: how long a collective may wait for a rank that does not arrive before it
    raises (gloo) or aborts the process (NCCL), so a hung rank ends the job. ``init_timeout_minutes``:
    how long joining may take, retries included; then a RuntimeError names this rank and the
    store address. Calling it again in a process that already joined returns the same information.
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
        _join_with_retries("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                           device=device if use_cuda else None,
                           timeout=timedelta(minutes=timeout_minutes),
                           init_timeout=timedelta(minutes=init_timeout_minutes))
        # Leave the group before interpreter teardown even when the caller does not: after a retried
        # join, a gloo group still alive when the process exits can abort it ("terminate called
        # without an active exception", seen in about 1 of 4 runs under load).
        atexit.register(cleanup_distributed)
    return DistInfo(rank, world_size, local_rank, device)


def _join_with_retries(backend: str, *, rank: int, world_size: int, device: torch.device | None,
                       timeout: timedelta, init_timeout: timedelta) -> None:
    """``init_process_group`` under a fresh store prefix; a failed try is retried with backoff
    (1, 2, 4 ... 30 s) until ``init_timeout`` has passed, then one error names rank and address.

    A try may take a third of ``init_timeout``: a rank whose peer failed early waits in its connect
    only that long, and both meet again in a later try (rank 0 keeps answering new tickets).
    """
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    deadline = time.monotonic() + init_timeout.total_seconds()
    delay, attempt = 1.0, 0
    while True:
        attempt += 1
        try:
            try_deadline = min(deadline, time.monotonic() + init_timeout.total_seconds() / 3)
            _join_once(backend, rank=rank, world_size=world_size, device=device, timeout=timeout,
                       deadline=try_deadline)
            return
        except (RuntimeError, OSError) as e:  # torch's DistError/DistStoreError are RuntimeErrors
            cleanup_distributed()
            _reset_group_counter()
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if time.monotonic() + delay >= deadline:
                raise RuntimeError(
                    f"rank {rank} of {world_size} could not join the {backend} process group through "
                    f"the store at {address} within {init_timeout.total_seconds():.0f} s "
                    f"({attempt} tries); last error: {reason}. Check that every rank was started, "
                    f"that {address} is reachable from this host, or raise dist.init_timeout_minutes"
                ) from e
        # Outside the except clause: the failed try's store (a server on rank 0 when torchrun's
        # agent serves none) is released before the next try binds the same port.
        print(f"warning (rank {rank}): joining the process group at {address} failed ({reason}); "
              f"retrying in {delay:.0f} s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(2 * delay, _MAX_BACKOFF_S)


def _reset_group_counter() -> None:
    # init_process_group names a group from a counter that only destroy_process_group resets. A try
    # that failed inside init_process_group leaves it one up on this rank alone, and the next try
    # would wait for keys ("<prefix>/1//cpu...") that a peer which failed earlier writes under "0".
    # The counter is private (distributed_c10d._world.group_count); a test asserts that it exists,
    # so a torch that renames it fails the suite instead of silently breaking retried joins.
    world = getattr(dist.distributed_c10d, "_world", None)
    if world is not None and hasattr(world, "group_count"):
        world.group_count = 0


def _join_once(backend: str, *, rank: int, world_size: int, device: torch.device | None,
               timeout: timedelta, deadline: float) -> None:
    # The "env://" rendezvous opens a client of the agent's store under torchrun (rank 0 serves
    # one itself when launched otherwise) without any prefix of its own.
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                       timeout=_remaining(deadline)))
    prefix = _agree_on_prefix(store, rank, world_size, deadline)
    kwargs: dict[str, Any] = {}
    if device is not None:
        kwargs["device_id"] = device  # binds NCCL to this GPU up front (no guessing at barrier)
    # Connecting must finish by the deadline; collectives then get their own timeout.
    settable = _timeout_setter() is not None
    # Without a way to change a group's timeout later, the group is created with the collectives'
    # timeout: then a try whose peer failed waits that long in its connect (not a third of the
    # join time), but a barrier while rank 0 writes a large checkpoint does not fail.
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world_size,
                            timeout=_remaining(deadline) if settable else timeout, **kwargs)
    set_collective_timeout(timeout)
    store.set_timeout(timeout)


def _timeout_setter() -> Callable[..., None] | None:
    """The function that changes the default group's timeout on this torch, or None.

    ``dist.set_timeout`` is public in recent torch; from torch 2.2 to then the same is the private
    ``distributed_c10d._set_pg_timeout`` (deprecated, with a FutureWarning, once the public one
    exists); torch 2.1 has neither.
    """
    public = getattr(dist, "set_timeout", None)
    if callable(public):
        return public
    private = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    return private if callable(private) else None


def set_collective_timeout(timeout: timedelta) -> bool:
    """Give every later collective of the default group ``timeout``; False where torch cannot."""
    setter = _timeout_setter()
    if setter is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        setter(timeout)
    return True


def _remaining(deadline: float) -> timedelta:
    return timedelta(seconds=max(deadline - time.monotonic(), 1.0))


def _agree_on_prefix(store: Any, rank: int, world_size: int, deadline: float) -> str:
    """A store prefix shared by every rank of this launch and used by no earlier one.

    Rank > 0 takes a ticket from a counter that only grows (a ticket is never handed out twice,
    whatever earlier launches left in the store) and waits for the answer to that ticket; rank 0
    draws a random prefix and answers every ticket not answered yet until all ``world_size - 1``
    others confirmed under that prefix. An answer can only come from a rank 0 that saw the ticket,
    i.e. one that runs now.
    """
    if rank == 0:
        return _issue_prefix(store, world_size, deadline)
    ticket = int(store.add(_JOIN + "tickets", 1))
    answer = f"{_JOIN}answer/{ticket}"
    store.wait([answer], _remaining(deadline))
    prefix = store.get(answer).decode()
    store.add(f"{prefix}joined", 1)
    return prefix


def _issue_prefix(store: Any, world_size: int, deadline: float) -> str:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"detkit/pg/{restart}-{uuid.uuid4().hex}/"  # the restart count only helps reading
    answered = int(store.add(_JOIN + "answered", 0))  # tickets an earlier rank 0 answered
    while int(store.add(f"{prefix}joined", 0)) < world_size - 1:
        issued = int(store.add(_JOIN + "tickets", 0))
        for ticket in range(answered + 1, issued + 1):
            store.set(f"{_JOIN}answer/{ticket}", prefix)
        if issued > answered:
            store.add(_JOIN + "answered", issued - answered)
            answered = issued
        if time.monotonic() > deadline:
            missing = world_size - 1 - int(store.add(f"{prefix}joined", 0))
            raise TimeoutError(f"{missing} of {world_size - 1} other ranks did not ask to join")
        time.sleep(0.02)
    return prefix


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
