"""``build_dataset``: a config split (``dataset`` + ``pipeline``) -> a dataset object.

A split config is ``{dataset: {type, ...}, pipeline: [...], batch_size, num_workers, ...}``
(the loader keys are read by ``build_dataloader``). ``root`` (the config's ``data.root``) is
joined to every relative path of the dataset; a dataset node may carry its own ``root``, which
is itself joined to ``data.root`` when relative.

Wrapper datasets (``ConcatDataset``, YOLO's mosaic) define ``from_config(cls, cfg, *, path,
root, transforms)`` and build their children with ``build_dataset_node``.
"""

from __future__ import annotations

from ..registry import DATASETS, ConfigError
from .base import resolve_path
from .transforms import build_pipeline

__all__ = ["build_dataset", "build_dataset_node", "SPLIT_KEYS"]

# Keys a split config may have; build_dataloader documents the loader ones.
SPLIT_KEYS = ("dataset", "pipeline", "batch_size", "num_workers", "aspect_ratio_grouping", "shuffle",
              "drop_last", "pin_memory", "persistent_workers", "prefetch_factor")


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
    return build_dataset_node(split_cfg["dataset"], f"{path}.dataset", root=root, transforms=pipeline)
