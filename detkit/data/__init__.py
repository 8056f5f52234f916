"""detkit datasets, transforms and loaders.

    from detkit.data import build_dataset, build_dataloader
    dataset = build_dataset(cfg["data"]["train"], root=cfg["data"]["root"])
    loader = build_dataloader(cfg["data"]["train"], dataset, train=True, seed=0)

Samples follow the contract in DESIGN.md (``detkit.data.base`` documents the raw dict used by
pipelines and dataset wrappers). The shapes generator (``detkit.data.shapes``) is not imported
here so that ``python -m detkit.data.shapes`` runs cleanly.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

from .base import DetectionDataset, ImageRecord, to_sample
from .builder import build_dataset, build_dataset_node
from .coco import CocoDetection
from .io import ImageReadError, image_size, read_image, read_mask
from .loader import InferenceSampler, build_dataloader, collate
from .segmentation import SemanticSegDataset
from .transforms import Letterbox, PadToMultiple, Pipeline, ResizeShortestEdge, build_pipeline
from .voc import VOC_CLASSES, ConcatDataset, VOCDetection
from .yolo import YoloDetection

__all__ = ["build_dataset", "build_dataset_node", "build_dataloader", "build_pipeline", "collate",
           "read_image", "read_mask", "image_size", "ImageReadError", "DetectionDataset", "ImageRecord",
           "to_sample", "CocoDetection", "VOCDetection", "ConcatDataset", "YoloDetection",
           "SemanticSegDataset", "VOC_CLASSES", "Pipeline", "ResizeShortestEdge", "Letterbox",
           "PadToMultiple", "InferenceSampler"]

_OWN = {"base", "builder", "coco", "io", "loader", "segmentation", "shapes", "transforms", "voc", "yolo"}


def _import_extensions() -> None:
    """Import the other modules of this package (e.g. ``mosaic.py``) so their registrations run."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _OWN or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:   # a broken extension must not take the core datasets down with it
            warnings.warn(f"detkit.data: could not import {info.name}.py ({type(e).__name__}: {e})",
                          stacklevel=2)
            continue
        for name in getattr(module, "__all__", []):
            globals()[name] = getattr(module, name)
            __all__.append(name)


_import_extensions()
