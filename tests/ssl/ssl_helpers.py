"""Tiny unlabeled image folders and pre-training configs for the tests in this folder."""

from pathlib import Path

import cv2
import numpy as np

VIEW = [{"type": "HorizontalFlip", "p": 0.5},
        {"type": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}]


def make_folder(root: Path, count: int = 8, size: int = 40) -> Path:
    """``count`` random PNG/JPEG images, half of them in a nested sub-folder."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("nested/deeper" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (size, size + 4 * i, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"im{i}.{'png' if i % 3 else 'jpg'}"), image)
    return root


def pretrain_config(root: Path, model: dict, *, iters: int = 4, batch: int = 4, local: int = 0) -> dict:
    views = [{"count": 2, "size": 32, "scale": [0.3, 1.0], "transforms": VIEW}]
    if local:
        views.append({"count": local, "size": 16, "scale": [0.1, 0.3], "transforms": VIEW})
    return {
        "model": model,
        "data": {"root": str(root), "train": {
            "dataset": {"type": "MultiViewDataset", "source": {"type": "ImageFolder", "img_dir": "."},
                        "views": views},
            "batch_size": batch, "num_workers": 0, "drop_last": True}},
        "train": {"max_iters": iters, "log_interval": 1, "eval_interval": 0,
                  "optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
                  "scheduler": {"type": "cosine", "warmup_iters": 1, "warmup_factor": 0.1},
                  "checkpoint": {"interval": 100, "keep": 0, "best_metric": None}},
    }


TINY_DARKNET = {"type": "Darknet53", "width_mult": 0.25, "depth_mult": 0.33, "out_features": ["c5"]}
R18 = {"type": "ResNet", "depth": 18, "out_features": ["c5"], "weights": None}
