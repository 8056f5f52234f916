"""``build_dataset``: a config split (``dataset`` + ``pipeline``) -> a dataset object.

A split config is ``{dataset: {type, ...}, pipeline: [...], batch_size, num_workers, ...}``
(the loader keys are read by ``build_dataloader``). ``root`` (the config's ``data.root``) is
joined to every relative path of the dataset; a dataset node may carry its own ``root``, which
is itself joined to ``data.root`` when relative.

Wrapper datasets (``ConcatDataset``, YOLO's mosaic) define ``from_config(cls, cfg, *, path,
root, transforms)`` and build their children with ``build_dataset_node``.

``skip_bad_images: true`` on a split turns on ``skip_bad_images`` of every dataset in it
(wrapped ones included): unreadable images are then skipped and counted instead of stopping.
A missing file or folder under a ``data.root`` that does not exist is reported as that root.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DatasetError
from ..registry import DATASETS, ConfigError
from .base import DetectionDataset, resolve_path
from .subset import take_subset
from .transforms import build_pipeline

__all__ = ["build_dataset", "build_dataset_node", "SPLIT_KEYS"]

# Keys a split config may have; build_dataloader documents the loader ones.
SPLIT_KEYS = ("dataset", "pipeline", "batch_size", "num_workers", "aspect_ratio_grouping", "shuffle",
              "drop_last", "pin_memory", "persistent_workers", "prefetch_factor", "skip_bad_images",
              "subset", "subset_seed")


def build_dataset_node(cfg: dict, path: str, *, root=None, transforms=None):
    """Build one dataset config node with ``root`` and the split's ``transforms`` (a Pipeline)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'type' key, got {type(cfg).__name__}")
    cfg = dict(cfg)
    own_root = cfg.pop("root", None)
    node_root = resolve_path(root, own_root) if own_root is not None else root
    node_root = str(node_root) if node_root is not None else None
    return DATASETS.build(cfg, path, root=node_root, transforms=transforms)


def build_dataset(split_cfg: dict, root=None, *, path: str = "data.split"):
    """The dataset of one split, its ``pipeline`` attached as ``dataset.transforms``."""
    if not isinstance(split_cfg, dict) or "dataset" not in split_cfg:
        raise ConfigError(f"{path}: a split needs a 'dataset' entry ({{type: CocoDetection, ...}})")
    for key in split_cfg:
        if key not in SPLIT_KEYS:
            from ..registry import closest
            raise ConfigError(f"{path}.{key}: unknown split key{closest(key, SPLIT_KEYS)}; "
                              f"valid keys: {', '.join(SPLIT_KEYS)}")
    pipeline = build_pipeline(split_cfg.get("pipeline"), f"{path}.pipeline")
    try:
        dataset = build_dataset_node(split_cfg["dataset"], f"{path}.dataset", root=root, transforms=pipeline)
    except (DatasetError, FileNotFoundError) as e:
        if root is not None and not Path(root).expanduser().is_dir():
            raise DatasetError(f"{e}\n  data.root '{root}' does not exist: point it at your copy of the "
                               f"data with --set data.root=/path/to/data") from e
        raise
    skip = split_cfg.get("skip_bad_images", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"{path}.skip_bad_images: expected true or false, got {skip!r}")
    for leaf in _leaf_datasets(dataset):
        leaf.split_path = path
        leaf.skip_bad_images = leaf.skip_bad_images or skip
    if split_cfg.get("subset") is not None:   # a seeded fraction of the images (detkit/data/subset.py)
        dataset = take_subset(dataset, split_cfg["subset"], split_cfg.get("subset_seed", 0), path=path)
    return dataset


def _leaf_datasets(obj, _depth: int = 0) -> list[DetectionDataset]:
    """The DetectionDatasets inside ``obj`` (itself, or those wrapped by mosaic / concat)."""
    if isinstance(obj, DetectionDataset):
        return [obj]
    if _depth > 8:
        return []
    children = list(getattr(obj, "datasets", None) or [])
    inner = getattr(obj, "dataset", None)
    if isinstance(inner, Dataset):
        children.append(inner)
    return [leaf for child in children for leaf in _leaf_datasets(child, _depth + 1)]
