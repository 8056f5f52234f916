"""Data loaders: collate, samplers for torchrun, aspect-ratio grouping, reproducible augmentation.

Batches are ``(list[Float[3,H,W]], list[dict])`` (``collate``); padding happens in the model.

Reproducibility: every sample is augmented with its own seed, derived from (seed, epoch,
dataset index, rank). So the same seed gives the same batches *and* the same augmentations
whatever ``num_workers`` is, and a resumed run replays the rest of an epoch exactly.

Trainer usage (mid-epoch resume included)::

    loader = build_dataloader(cfg["data"]["train"], dataset, train=True, seed=cfg["train"]["seed"])
    for epoch in range(start_epoch, max_epochs):
        loader.set_epoch(epoch, skip_batches=iters_done_in_epoch if epoch == start_epoch else 0)
        for images, targets in loader:    # len(loader) = batches per epoch, same on every rank
            ...

Under ``torch.distributed`` the training sampler shards a shuffled order across ranks (padded so
every rank gets the same number of batches, as DDP needs); the evaluation sampler
(``InferenceSampler``) gives each rank a contiguous shard without padding, so across ranks every
image is seen exactly once.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..registry import ConfigError

__all__ = ["collate", "build_dataloader", "InferenceSampler", "GroupedBatchSampler", "DetkitLoader",
           "seed_dataset", "sample_seed", "dist_info"]


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]) without stacking (sizes differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sample_seed(seed: int, epoch: int, index: int, rank: int = 0) -> int:
    """A 32-bit seed for augmenting dataset item ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index, rank]).generate_state(1)[0])


def seed_dataset(obj, seed: int, _depth: int = 0, *, epoch: int | None = None) -> None:
    """Seed every pipeline / seedable object in a (possibly wrapped) dataset.

    Calls ``set_augment_epoch(epoch)`` (when ``epoch`` is given: transforms and mosaics with an
    ``until_epoch`` switch off from that epoch on) and then ``set_seed(seed)`` on
    ``obj.transforms`` and on ``obj`` itself when they have them, then recurses into
    ``obj.dataset`` and ``obj.datasets`` (wrappers such as mosaic or concat).
    """
    if obj is None or _depth > 8:
        return
    for target in (getattr(obj, "transforms", None), obj):
        set_epoch = getattr(target, "set_augment_epoch", None)
        if epoch is not None and callable(set_epoch):
            set_epoch(epoch)
        set_seed = getattr(target, "set_seed", None)
        if callable(set_seed):
            set_seed(seed)
    inner = getattr(obj, "dataset", None)
    if isinstance(inner, Dataset):
        seed_dataset(inner, seed, _depth + 1, epoch=epoch)
    for child in getattr(obj, "datasets", None) or []:
        seed_dataset(child, seed, _depth + 1, epoch=epoch)


class InferenceSampler(Sampler):
    """Rank ``r`` of ``w`` gets the contiguous indices [r*n/w, (r+1)*n/w): no padding, no overlap."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        begin = self.size * self.rank // self.world_size
        end = self.size * (self.rank + 1) // self.world_size
        self.indices = range(begin, end)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:   # same order every epoch
        pass


class SizedSampler(Protocol):
    """An index sampler with a length (``DistributedSampler``, ``InferenceSampler``)."""

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


class GroupedBatchSampler(Sampler):
    """Batches of ``(index, seed, epoch)`` from an index sampler, optionally grouped by aspect ratio.

    With ``group_ids`` (0 = landscape, 1 = portrait per index), a batch is emitted as soon as one
    group has ``batch_size`` items, so batches hold similar shapes (less padding). Leftovers of
    the groups are batched together at the end, so the batch count equals the ungrouped one:
    ``ceil(n / batch_size)`` (``floor`` with ``drop_last``). ``skip(k)`` drops the first ``k``
    batches of the next pass only (mid-epoch resume).
    """

    def __init__(self, sampler: SizedSampler, batch_size: int, *, drop_last: bool = False,
                 group_ids: list[int] | None = None, seed: int = 0, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), bool(drop_last)
        self.group_ids, self.seed, self.rank = group_ids, int(seed), int(rank)
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def skip(self, num_batches: int) -> None:
        self._skip = max(0, int(num_batches))

    def _index_batches(self):
        if self.group_ids is None:
            order = list(self.sampler)
            for i in range(0, len(order), self.batch_size):
                yield order[i: i + self.batch_size]
            return
        buckets: dict[int, list[int]] = {}
        for idx in self.sampler:
            bucket = buckets.setdefault(self.group_ids[idx], [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()
        rest = [i for key in sorted(buckets) for i in buckets[key]]
        for i in range(0, len(rest), self.batch_size):
            yield rest[i: i + self.batch_size]

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for k, batch in enumerate(self._index_batches()):
            if self.drop_last and len(batch) < self.batch_size:
                return
            if k >= skip:
                yield [(i, sample_seed(self.seed, self.epoch, i, self.rank), self.epoch) for i in batch]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class _SeededView(Dataset):
    """Receives ``(index, seed, epoch)`` from the batch sampler, seeds the pipelines (and tells
    them the epoch: it travels with every index, so persistent workers see it too), returns the sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed, epoch = item
        seed_dataset(self.dataset, seed, epoch=epoch)
        if torch.utils.data.get_worker_info() is not None:
            # Only in workers: the main process's global RNGs belong to the trainer.
            random.seed(seed)
            np.random.seed(seed)
        return self.dataset[index]

    def __getattr__(self, name):   # class_names, coco_gt ... of the real dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _worker_init(worker_id: int) -> None:
    # Workers share 2-16 cores with each other and the trainer: one thread each.
    torch.set_num_threads(1)
    import cv2
    cv2.setNumThreads(0)


class DetkitLoader(DataLoader):
    """A DataLoader with ``set_epoch(epoch, skip_batches=0)`` (shuffle order + augmentation seeds)."""

    batch_sampler: GroupedBatchSampler  # always given by build_dataloader

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch)
        self.batch_sampler.skip(skip_batches)

    @property
    def source(self):
        """The dataset object passed to ``build_dataloader``."""
        return self.dataset.dataset


def _group_ids(dataset) -> list[int] | None:
    ratios = getattr(dataset, "aspect_ratios", None)
    if ratios is None:
        return None
    return [0 if r >= 1.0 else 1 for r in ratios()]


def build_dataloader(split_cfg: dict, dataset, *, train: bool, seed: int = 0) -> DetkitLoader:
    """A loader over ``dataset`` configured by the split's loader keys.

    Keys (defaults): ``batch_size`` (required, per process), ``num_workers`` (0),
    ``aspect_ratio_grouping`` (false), ``shuffle`` (= train), ``drop_last`` (false),
    ``pin_memory`` (false), ``persistent_workers`` (false), ``prefetch_factor`` (torch default).
    """
    if "batch_size" not in split_cfg:
        raise ConfigError("data split: 'batch_size' is required")
    rank, world = dist_info()
    batch_size = int(split_cfg["batch_size"])
    sampler: SizedSampler
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank,
                                     shuffle=bool(split_cfg.get("shuffle", True)), seed=seed)
    else:
        sampler = InferenceSampler(len(dataset), rank, world)
    group_ids = _group_ids(dataset) if split_cfg.get("aspect_ratio_grouping", False) else None
    drop_last = bool(split_cfg.get("drop_last", False)) and train
    batch_sampler = GroupedBatchSampler(sampler, batch_size, drop_last=drop_last,
                                        group_ids=group_ids, seed=seed, rank=rank)
    num_workers = int(split_cfg.get("num_workers", 0))
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = bool(split_cfg.get("persistent_workers", False))
        if split_cfg.get("prefetch_factor") is not None:
            extra["prefetch_factor"] = int(split_cfg["prefetch_factor"])
    return DetkitLoader(_SeededView(dataset), batch_sampler=batch_sampler, num_workers=num_workers,
                        collate_fn=collate, pin_memory=bool(split_cfg.get("pin_memory", False)),
                        worker_init_fn=_worker_init if num_workers > 0 else None, **extra)
