"""detkit: object detection and semantic segmentation on PyTorch.

Public API::

    import detkit
    cfg = detkit.load_config("configs/centernet/centernet_r18_shapes.yaml", ["train.max_iters=100"])
    model = detkit.build_model(cfg["model"])
    dataset = detkit.build_dataset(cfg["data"]["val"], root=cfg["data"].get("root"))
    predictor = detkit.Predictor(cfg, "work_dirs/x/last.pth")
"""

from __future__ import annotations

import importlib

from .config import ConfigError, load_config

__version__ = "0.1.0"

_LAZY = {
    "build_model": "detkit.models",
    "build_dataset": "detkit.data",
    "build_dataloader": "detkit.data",
    "build_evaluator": "detkit.evaluation",
    "Predictor": "detkit.inference",
    "train": "detkit.engine",
}

__all__ = ["__version__", "ConfigError", "load_config", *_LAZY]


def __getattr__(name: str):
    # Lazy so that `import detkit` stays fast and `detkit.config` works without torch set up.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detkit' has no attribute '{name}'")
