"""The one small base class of detkit datasets, box validation, and the sample contract.

Legend: N boxes, H x W image size, C classes. Boxes are absolute ``xyxy`` pixel-edge
coordinates (a box covering only pixel column 3 spans x = 3..4).

A dataset subclass fills ``self.records`` (one ``ImageRecord`` per image, boxes in original
image pixels, already validated) plus ``class_names`` / ``label_to_cat_id``. The base class reads
images, applies the pipeline and converts to the sample contract::

    raw = dataset.get_raw(i)        # numpy dict, original pixels (used by mosaic-style wrappers)
    raw = dataset.transforms(raw)   # detkit.data.transforms.Pipeline: numpy dict -> numpy dict
    image, target = to_sample(raw)  # Float[3,H,W] in [0,1] and the target dict of DESIGN.md

Raw dict keys: ``image`` UInt8[H,W,3] RGB, ``boxes`` Float32[N,4], ``labels`` Int64[N],
``iscrowd`` Bool[N], optional ``difficult`` Bool[N], optional ``sem_seg`` UInt8[H,W]
(0 = background, k+1 = label k, 255 = ignore), optional ``masks`` UInt8[N,H,W] (0/1 instance
masks, one per box; ``Bool[N,H,W]`` in the sample), ``image_id`` int, ``orig_size`` (H0, W0),
``scale`` (sx, sy) and ``offset`` (ox, oy) with ``transformed = original * scale + offset``.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError, warn_once
from .io import ImageReadError, read_image

__all__ = ["ImageRecord", "DetectionDataset", "BoxChecker", "to_sample", "resolve_path", "make_coco",
           "require_dir", "require_file"]

CLIP_TOLERANCE = 0.5   # px: coordinates this far outside the image are rounding noise, clipped silently


@overload
def resolve_path(root, path: None) -> None: ...
@overload
def resolve_path(root, path: str | os.PathLike) -> Path: ...
def resolve_path(root, path):
    """``path`` joined to ``root`` unless it is absolute (or ``root`` is None)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if root is None or path.is_absolute():
        return path
    return Path(root).expanduser() / path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetError naming it (``what``: "YoloDetection: image folder")."""
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "not found"
        raise DatasetError(f"{what} {state}: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a DatasetError naming it."""
    if not path.is_file():
        state = "is a folder, not a file" if path.exists() else "not found"
        raise DatasetError(f"{what} {state}: {path}")
    return path


@dataclass
class ImageRecord:
    """One image and its validated annotations, in original-image pixels."""

    image_id: int
    file: Path
    height: int
    width: int
    boxes: np.ndarray                 # Float32[N,4] xyxy
    labels: np.ndarray                # Int64[N] in 0..C-1
    iscrowd: np.ndarray               # Bool[N]
    difficult: np.ndarray | None = None   # Bool[N] (VOC) or None
    extra: dict = field(default_factory=dict)


class BoxChecker:
    """Clips / drops invalid boxes and counts what it did, for one summary warning per dataset."""

    def __init__(self, source: str):
        self.source = source
        self.counts = {"clipped": 0, "non_finite": 0, "empty": 0}
        self.examples: list[str] = []

    def __call__(self, boxes: np.ndarray, height: int, width: int,
                 names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Float[N,4] xyxy -> (clipped boxes, Bool[N] keep). ``names`` label each box in messages."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        finite = np.asarray(np.isfinite(boxes).all(axis=1))
        safe = np.where(finite[:, None], boxes, 0.0)
        limits = np.array([width, height, width, height], np.float64)
        clipped = np.clip(safe, 0.0, limits)
        moved = finite & (np.abs(clipped - safe) > CLIP_TOLERANCE).any(axis=1)
        empty = finite & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
        for mask, key in ((~finite, "non_finite"), (empty, "empty"), (moved & ~empty, "clipped")):
            self.counts[key] += int(mask.sum())
            for i in np.flatnonzero(mask)[: max(0, 3 - len(self.examples))]:
                self.examples.append(f"{names[i]} ({key}: {boxes[i].round(2).tolist()})")
        return clipped.astype(np.float32), finite & ~empty

    def report(self) -> dict:
        """Warn once if anything was clipped or dropped; returns the counts."""
        dropped = self.counts["non_finite"] + self.counts["empty"]
        if dropped or self.counts["clipped"]:
            warn_once(
                f"{self.source}: {self.counts['clipped']} boxes clipped to the image, {dropped} dropped "
                f"({self.counts['non_finite']} non-finite, {self.counts['empty']} zero/negative area "
                f"inside the image); e.g. {'; '.join(self.examples)}")
        return dict(self.counts)


def make_coco(dataset_dict: dict):
    """A pycocotools COCO object from an in-memory dict, without its stdout chatter."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = dataset_dict
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_sample(raw: dict) -> tuple[torch.Tensor, dict]:
    """Raw numpy dict -> (Float[3,H,W] RGB in [0,1], target dict of the sample contract)."""
    image = np.ascontiguousarray(raw["image"])
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    tensor = tensor.float().div_(255.0) if image.dtype == np.uint8 else tensor.float()
    n = len(raw["labels"])
    target = {
        "boxes": torch.as_tensor(np.asarray(raw["boxes"], np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(raw["labels"], np.int64).reshape(-1)),
        "image_id": int(raw["image_id"]),
        "orig_size": torch.as_tensor(raw["orig_size"], dtype=torch.int64),
        "scale": torch.as_tensor(raw.get("scale", (1.0, 1.0)), dtype=torch.float32),
        "offset": torch.as_tensor(raw.get("offset", (0.0, 0.0)), dtype=torch.float32),
        "iscrowd": torch.as_tensor(np.asarray(raw.get("iscrowd", np.zeros(n)), bool).reshape(-1)),
    }
    if raw.get("difficult") is not None:
        target["difficult"] = torch.as_tensor(np.asarray(raw["difficult"], bool).reshape(-1))
    if raw.get("sem_seg") is not None:
        target["sem_seg"] = torch.from_numpy(np.ascontiguousarray(raw["sem_seg"]).astype(np.int64))
    if raw.get("masks") is not None:
        masks = np.asarray(raw["masks"]).reshape(n, *image.shape[:2])
        target["masks"] = torch.from_numpy(np.ascontiguousarray(masks) > 0)
    return tensor, target


class DetectionDataset(Dataset):
    """Base of every detkit dataset: ``records`` -> raw dict -> pipeline -> sample.

    Subclasses set ``records``, ``class_names``, ``label_to_cat_id`` and may override
    ``load_extra(record, raw)`` to add e.g. ``sem_seg``. With ``skip_bad_images`` an unreadable
    image is counted (``num_skipped``, per process), warned about once and replaced by the next
    readable one; otherwise ``ImageReadError`` names the file and the option. ``split_path`` (set
    by ``build_dataset``, e.g. ``data.train``) says where that option goes in the config.
    """

    records: list[ImageRecord]
    class_names: list[str]
    label_to_cat_id: list[int]

    def __init__(self, *, transforms=None, skip_bad_images: bool = False):
        self.transforms = transforms
        self.skip_bad_images = bool(skip_bad_images)
        self.num_skipped = 0
        self.split_path: str | None = None
        self.box_report: dict = {}
        self._stored_frame: set = set()   # files read without EXIF rotation (warned once each)

    @property
    def seg_class_names(self) -> list[str]:
        """Names indexed by ``sem_seg`` values: background first, then ``class_names``."""
        return ["background", *self.class_names]

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image (original pixels), for aspect-ratio grouping."""
        return [r.width / max(r.height, 1) for r in self.records]

    def read(self, record: ImageRecord) -> np.ndarray:
        image = read_image(record.file)
        if image.shape[:2] != (record.height, record.width):
            stored = read_image(record.file, exif=False)
            if stored.shape[:2] == (record.height, record.width):
                # The annotations were made on the stored (EXIF-unrotated) frame: follow them.
                if record.file not in self._stored_frame:
                    self._stored_frame.add(record.file)
                    warn_once(f"{record.file}: annotated size {record.height}x{record.width} is the "
                              f"stored frame, not the EXIF-rotated one; EXIF orientation not applied",
                              all_ranks=True)
                return stored
            raise ImageReadError(
                f"{record.file}: image is {image.shape[0]}x{image.shape[1]} (HxW, EXIF orientation "
                f"applied) but its annotations say {record.height}x{record.width}")
        return image

    def load_extra(self, record: ImageRecord, raw: dict) -> None:
        """Hook: add more keys (``sem_seg``) to ``raw``."""

    def get_raw(self, index: int) -> dict:
        """The untransformed sample of image ``index`` as a numpy dict (keys in the module doc)."""
        record = self.records[index]
        raw = {"image": self.read(record), "boxes": record.boxes.copy(), "labels": record.labels.copy(),
               "iscrowd": record.iscrowd.copy(), "image_id": record.image_id,
               "orig_size": (record.height, record.width), "scale": (1.0, 1.0), "offset": (0.0, 0.0)}
        if record.difficult is not None:
            raw["difficult"] = record.difficult.copy()
        self.load_extra(record, raw)
        return raw

    def get_raw_checked(self, index: int) -> dict:
        """``get_raw``, or with ``skip_bad_images`` the next readable image after a bad one."""
        for attempt in range(min(len(self), 32)):
            i = (index + attempt) % len(self)
            try:
                return self.get_raw(i)
            except ImageReadError as e:
                if not self.skip_bad_images:
                    where = self.split_path or "<split>"
                    raise ImageReadError(f"{e}; to skip unreadable images (each is reported with a "
                                         f"warning and counted) set {where}.skip_bad_images: true") from None
                self.num_skipped += 1
                warn_once(f"skipping unreadable image: {e}", all_ranks=True)
        raise ImageReadError(f"{type(self).__name__}: 32 unreadable images in a row from index {index}; "
                             f"check the image folder")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        raw = self.get_raw_checked(index)
        if self.transforms is not None:
            raw = self.transforms(raw)
        return to_sample(raw)

    def coco_gt(self):
        """Ground truth as a pycocotools COCO object in original pixels (difficult -> iscrowd=1)."""
        images, annotations = [], []
        for r in self.records:
            images.append({"id": r.image_id, "height": r.height, "width": r.width, "file_name": r.file.name})
            hard = r.iscrowd if r.difficult is None else (r.iscrowd | r.difficult)
            for box, label, crowd in zip(r.boxes.tolist(), r.labels.tolist(), hard.tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append({"id": len(annotations) + 1, "image_id": r.image_id,
                                    "category_id": self.label_to_cat_id[label], "iscrowd": int(crowd),
                                    "bbox": [box[0], box[1], w, h], "area": w * h})
        categories = [{"id": c, "name": n} for c, n in zip(self.label_to_cat_id, self.class_names)]
        return make_coco({"images": images, "annotations": annotations, "categories": categories})

    def filter_empty_records(self) -> None:
        """Keep only images with at least one box that is not crowd / difficult."""
        def useful(r: ImageRecord) -> bool:
            hard = r.iscrowd if r.difficult is None else (r.iscrowd | r.difficult)
            return bool((~hard).any())
        self.records = [r for r in self.records if useful(r)]
