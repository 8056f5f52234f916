"""Unlabeled images for pre-training: an image folder, or any detkit dataset with labels ignored.

``ImageFolder`` lists every image file under a folder (recursively, sorted); ``MultiViewDataset``
turns the images of a ``source`` dataset (an ``ImageFolder`` or any detkit dataset, whose boxes
and labels are ignored) into views. A sample is ``(Float[Vg,3,S,S], {"image_id", "local_views":
Float[Vl,3,s,s]})`` (``local_views`` only with multi-crop), RGB in [0,1].

Unreadable files behave as in detection training: ``ImageReadError`` naming the file, or with
``skip_bad_images: true`` a warning, a count (``num_skipped``) and the next readable image.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data.base import resolve_path
from ..data.builder import build_dataset_node
from ..data.io import ImageReadError, read_image
from ..registry import DATASETS, ConfigError, construct
from .regions import ProposalCrops
from .views import MultiView, build_views

__all__ = ["ImageFolder", "MultiViewDataset", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


@DATASETS.register()
class ImageFolder(Dataset):
    """Every file under ``img_dir`` whose suffix is in ``extensions`` (case-insensitive), recursively.

    ``root`` (the config's ``data.root``) is joined to a relative ``img_dir``. Items are raw dicts
    ``{"image": UInt8[H,W,3], "image_id": index}`` (``get_raw_checked``) for ``MultiViewDataset``.
    """

    def __init__(self, *, img_dir: str, root: str | None = None, transforms=None,
                 extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS, skip_bad_images: bool = False):
        folder = resolve_path(root, img_dir)
        if folder is None or not folder.is_dir():
            raise ValueError(f"ImageFolder: image folder not found: {folder}")
        suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        self.folder = folder
        self.files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not self.files:
            raise ValueError(f"ImageFolder: no image files ({', '.join(sorted(suffixes))}) under {folder}")
        self.transforms = transforms
        self.skip_bad_images = bool(skip_bad_images)
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.files)

    def get_raw_checked(self, index: int) -> dict:
        for attempt in range(min(len(self), 32)):
            i = (index + attempt) % len(self)
            try:
                return {"image": read_image(self.files[i]), "image_id": i}
            except ImageReadError as e:
                if not self.skip_bad_images:
                    raise
                self.num_skipped += 1
                warnings.warn(f"skipping unreadable image ({self.num_skipped} so far): {e}", stacklevel=2)
        raise ImageReadError(f"ImageFolder: 32 unreadable images in a row from index {index} in "
                             f"{self.folder}")

    def __getitem__(self, index: int) -> dict:
        return self.get_raw_checked(index)


def _to_tensor(views: list[np.ndarray]) -> Tensor:
    stacked = np.ascontiguousarray(np.stack(views))                  # [V,S,S,3] uint8
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0)


@DATASETS.register()
class MultiViewDataset(Dataset):
    """Views of the images of ``dataset`` (see the module docstring); labels are never read.

    The split's ``pipeline`` (e.g. a ``ResizeShortestEdge`` for large photos) runs on each image
    before the views are cut from it. ``proposal_crops`` (an :class:`~detkit.ssl.regions.ProposalCrops`)
    first narrows each image to one dilated unsupervised object proposal, shared by all its views.
    """

    def __init__(self, *, dataset: Any, views: MultiView, transforms=None,
                 proposal_crops: ProposalCrops | None = None):
        if not callable(getattr(dataset, "get_raw_checked", None)):
            raise ValueError(f"MultiViewDataset: source {type(dataset).__name__} has no get_raw_checked(); "
                             f"use ImageFolder or a detkit detection/segmentation dataset")
        self.dataset, self.views, self.transforms = dataset, views, transforms
        self.proposal_crops = proposal_crops
        self._rng = np.random.default_rng(0)

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, root=None, transforms=None):
        cfg = dict(cfg)
        for key in ("source", "views"):
            if key not in cfg:
                raise ConfigError(f"{path}: MultiViewDataset needs '{key}'")
        unknown = set(cfg) - {"source", "views", "proposal_crops"}
        if unknown:
            raise ConfigError(f"{path}.{sorted(unknown)[0]}: unknown key; MultiViewDataset takes "
                              f"source, views and proposal_crops")
        source = build_dataset_node(cfg["source"], f"{path}.source", root=root)
        views = build_views(cfg["views"], f"{path}.views")
        crops = cfg.get("proposal_crops")
        if crops is not None and not isinstance(crops, dict):
            raise ConfigError(f"{path}.proposal_crops: expected a mapping ({{p: 1.0, dilate: [1.5, 2.5]}}), "
                              f"got {crops!r}")
        try:
            proposals = None if crops is None else construct(ProposalCrops, crops, f"{path}.proposal_crops")
            return cls(dataset=source, views=views, transforms=transforms, proposal_crops=proposals)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_seed(self, seed: int) -> None:
        self.views.set_seed(seed)
        self._rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0B7EC7]))

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        raw = self.dataset.get_raw_checked(index)
        image = raw["image"]
        if self.transforms is not None and getattr(self.transforms, "compose", None) is not None:
            image = self.transforms({"image": image, "boxes": np.zeros((0, 4), np.float32),
                                     "labels": np.zeros(0, np.int64)})["image"]
        if self.proposal_crops is not None:
            image = self.proposal_crops(image, self._rng)
        global_views, local_views = self.views(image)
        target: dict = {"image_id": int(raw.get("image_id", index))}
        if local_views:
            target["local_views"] = _to_tensor(local_views)
        return _to_tensor(global_views), target
