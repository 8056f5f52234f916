"""``data.<split>.subset``: a seeded, deterministic fraction of a dataset's images (low-label runs).

``subset: 0.1`` keeps ``round(0.1 * N)`` images (at least one) chosen by
``numpy.random.default_rng(subset_seed)`` (``subset_seed`` defaults to 0, independent of
``train.seed``, so runs with different training seeds see the same labeled images), kept in
their original order. A detkit dataset keeps those ``records``; any other dataset is wrapped.
Meant for training splits: evaluation of a reduced ``data.val`` would still compare against
the ground truth of every image.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from ..registry import ConfigError

__all__ = ["subset_indices", "take_subset", "SubsetDataset"]


def subset_indices(size: int, fraction: float, seed: int = 0) -> list[int]:
    """Sorted indices of ``max(1, round(fraction * size))`` of ``range(size)``, chosen by ``seed``."""
    count = max(1, int(round(fraction * size)))
    chosen = np.random.default_rng(int(seed)).choice(size, size=min(count, size), replace=False)
    return sorted(chosen.tolist())


class SubsetDataset(Dataset):
    """``dataset`` restricted to ``indices``; other attributes (class_names ...) pass through."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def aspect_ratios(self) -> list[float]:
        ratios = self.dataset.aspect_ratios()
        return [ratios[i] for i in self.indices]

    def __getattr__(self, name):
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def take_subset(dataset, fraction, seed=0, *, path: str = "data.split"):
    """``dataset`` reduced to a seeded ``fraction`` of its images (see the module docstring)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{path}.subset: expected a fraction in (0, 1], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{path}.subset_seed: expected an integer, got {seed!r}")
    indices = subset_indices(len(dataset), float(fraction), seed)
    records = getattr(dataset, "records", None)
    if isinstance(records, list) and len(records) == len(dataset):
        dataset.records = [records[i] for i in indices]
        return dataset
    return SubsetDataset(dataset, indices)
