"""YOLO txt labels: one image ``.../images/x.jpg`` -> ``.../labels/x.txt`` with lines ``cls cx cy w h``.

Coordinates are normalised to [0, 1] by the image width / height (of the image as displayed,
EXIF orientation applied). A line with more than five numbers is a polygon ``cls x1 y1 x2 y2 ...``
(Ultralytics' segment labels, at least 3 points) and becomes its bounding box, plus its mask with
``instance_masks: true``. Labels are the class indices; ``label_to_cat_id`` is ``label + 1``:
the COCO ``category_id`` Ultralytics itself writes for a non-COCO dataset (its ``class_map`` is
``1..nc``), so detkit's and Ultralytics' ``predictions.json`` on the same data score against each
other, and COCO ids start at 1 (0 is background for torchvision's COCO models).

Two ways to name the files:

* ``img_dir`` + ``label_dir`` + ``class_names``: images under ``img_dir`` (recursively), labels
  under ``label_dir`` at the same relative path.
* ``data_yaml`` + ``split`` (an Ultralytics ``data.yaml``)::

      path: /datasets/mine        # dataset folder; relative: to the yaml's folder; absent: that folder
      train: images/train         # a folder, a .txt list of image paths, or a list of those
      val: images/val
      test: images/test           # optional
      names: [cat, dog]           # or {0: cat, 1: dog}

  Split entries are relative to ``path``; lines of a .txt list are relative to the list's folder.
  As in Ultralytics, an image's label file is its path with the last ``images`` folder replaced
  by ``labels`` and the suffix by ``.txt``.

An image without a label file is a background image (no objects); their number is printed in one
summary line. Label files in a label folder that match no image are reported in one warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from ..config import load_yaml
from ..errors import DatasetError, note_once, warn_once
from ..registry import DATASETS, ConfigError
from .base import (
    BoxChecker,
    DetectionDataset,
    ImageRecord,
    make_coco,
    require_dir,
    require_file,
    resolve_path,
)
from .io import IMAGE_EXTENSIONS, image_size
from .polygons import clip_for_rasterising, polygon_masks

__all__ = ["YoloDetection", "IMAGE_EXTENSIONS", "parse_yolo_objects", "parse_yolo_txt", "read_data_yaml",
           "yolo_label_path"]


def parse_yolo_objects(txt: Path, num_classes: int
                       ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """Labels Int64[N], normalised boxes Float[N,4] xyxy and, per object, the normalised polygon
    Float[P,2] (x, y) of a polygon line or None for a box line, of one label file."""
    labels: list[int] = []
    boxes: list[list[float]] = []
    polygons: list[np.ndarray | None] = []
    for lineno, line in enumerate(txt.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = int(float(parts[0])), [float(v) for v in parts[1:]]
        except (ValueError, OverflowError):   # OverflowError: a class index of inf
            raise DatasetError(f"{txt}:{lineno}: not numbers: {line.strip()!r}") from None
        if float(parts[0]) != cls or not 0 <= cls < num_classes:
            raise DatasetError(f"{txt}:{lineno}: class index {parts[0]} is outside 0..{num_classes - 1} "
                               f"(the {num_classes} class names)")
        if len(values) == 4:
            cx, cy, w, h = values
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            polygons.append(None)
        elif len(values) >= 6 and len(values) % 2 == 0:
            points = np.array(values, np.float64).reshape(-1, 2)
            boxes.append([*points.min(axis=0).tolist(), *points.max(axis=0).tolist()])
            polygons.append(points)
        elif len(values) > 4:
            raise DatasetError(f"{txt}:{lineno}: a polygon line 'cls x1 y1 x2 y2 x3 y3 ...' needs x y "
                               f"pairs, got an odd {len(values)} coordinates")
        else:
            raise DatasetError(f"{txt}:{lineno}: expected 'cls cx cy w h' (a box) or 'cls x1 y1 x2 y2 "
                               f"x3 y3 ...' (a polygon of at least 3 points), got {len(parts)} values")
        labels.append(cls)
    return np.array(labels, np.int64), np.array(boxes, np.float64).reshape(-1, 4), polygons


def parse_yolo_txt(txt: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels Int64[N] and normalised boxes Float[N,4] xyxy of one label file (polygons -> boxes)."""
    labels, boxes, _ = parse_yolo_objects(txt, num_classes)
    return labels, boxes


def yolo_label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path -> ``labels``, suffix -> ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _class_names(names, source: Path) -> list[str]:
    """A data.yaml ``names`` entry (list, or {id: name} with ids 0..N-1) -> names in index order."""
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: 'names' keys must be class indices, got {list(names)}") from None
        if ids != list(range(len(ids))):
            raise DatasetError(f"{source}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        by_id = {int(k): str(v) for k, v in names.items()}
        return [by_id[i] for i in ids]
    raise DatasetError(f"{source}: 'names' must be a list or an {{id: name}} mapping, got {names!r}")


def read_data_yaml(path: Path, split: str) -> tuple[list[Path], list[str]]:
    """The image sources (folders or .txt lists, absolute) of ``split`` and the class names."""
    require_file(path, "YoloDetection: data_yaml")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DatasetError(f"{path}: expected a mapping with 'names' and the split folders "
                           f"(path, train, val[, test])")
    base = path.parent / str(data.get("path") or ".")
    if data.get(split) in (None, ""):
        splits = [k for k in ("train", "val", "test") if data.get(k)]
        raise DatasetError(f"{path}: no '{split}' entry (it has: {', '.join(splits) or 'none'})")
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    names = _class_names(data["names"], path)
    if data.get("nc") is not None and int(data["nc"]) != len(names):
        raise DatasetError(f"{path}: nc is {data['nc']} but 'names' has {len(names)} entries")
    return [(base / str(e)).resolve() for e in entries], names


def _list_images(source: Path) -> list[Path]:
    """Image files of a folder (recursively) or of a .txt list (one path a line)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if source.is_file() and source.suffix == ".txt":
        lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [(source.parent / ln).resolve() for ln in lines]
    raise DatasetError(f"YoloDetection: image folder or list not found: {source}")


@DATASETS.register()
class YoloDetection(DetectionDataset):
    """YOLO txt labels from ``img_dir``/``label_dir`` + ``class_names``, or from an Ultralytics
    ``data_yaml`` and its ``split`` (train / val / test); paths relative to ``root``.

    ``instance_masks: true`` (Mask R-CNN) adds ``masks`` UInt8[N,H,W] to every sample, one per
    box: a polygon line (Ultralytics' segment labels) is rasterised at the image size
    (``polygon_masks``); a box line in the same data gets its filled box as mask, and their number
    is reported in one warning. The txt polygons are the stored form: bitmaps exist only per
    loaded sample, as with the COCO reader.
    """

    def __init__(self, img_dir: str | None = None, label_dir: str | None = None,
                 class_names: list[str] | None = None, *, data_yaml: str | None = None, split: str = "train",
                 root: str | None = None, transforms=None, filter_empty: bool = False,
                 instance_masks: bool = False, skip_bad_images: bool = False):
        super().__init__(transforms=transforms, skip_bad_images=skip_bad_images)
        self.instance_masks = bool(instance_masks)
        label_of: Callable[[Path], Path] = yolo_label_path
        if data_yaml is not None:
            if img_dir is not None or label_dir is not None:
                raise ConfigError("YoloDetection: give either data_yaml (+ split) or img_dir + label_dir")
            source = resolve_path(root, data_yaml)
            sources, names = read_data_yaml(source, split)
            if class_names is not None and [str(n) for n in class_names] != names:
                raise ConfigError(f"YoloDetection: class_names {class_names} differ from the names "
                                  f"{names} of {source}; leave class_names out")
            files = sorted({f for s in sources for f in _list_images(s)})
            label_dirs = [yolo_label_path(s / "x").parent for s in sources if s.is_dir()]
        else:
            if img_dir is None or label_dir is None or class_names is None:
                raise ConfigError("YoloDetection: needs img_dir, label_dir and class_names, or data_yaml")
            images = require_dir(resolve_path(root, img_dir), "YoloDetection: image folder")
            labels = require_dir(resolve_path(root, label_dir), "YoloDetection: label folder")
            names, files, label_dirs = [str(n) for n in class_names], self._files(images), [labels]

            def paired_label(image: Path) -> Path:
                return (labels / image.relative_to(images)).with_suffix(".txt")
            label_of = paired_label
        self.class_names = names
        self.label_to_cat_id = list(range(1, len(names) + 1))
        self.source = str(source if data_yaml is not None else label_dirs[0])
        self._load(files, label_of, label_dirs)
        if filter_empty:
            self.filter_empty_records()

    @staticmethod
    def _files(img_dir: Path) -> list[Path]:
        return sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)

    def _load(self, files: list[Path], label_of, label_dirs: list[Path]) -> None:
        """Fill ``records``; report background images and label files without an image."""
        checker = BoxChecker(self.source)
        self.records, background = [], 0
        for k, file in enumerate(files):
            txt = label_of(file)
            background += not txt.is_file()
            self.records.append(self._record(k, file, txt, checker))
        self.box_report = checker.report()
        if self.instance_masks:
            polygons = [p for r in self.records for p in r.extra["polygons"]]
            self.num_box_masks = sum(p is None for p in polygons)
            if self.num_box_masks:
                warn_once(f"{self.source}: instance_masks: {self.num_box_masks} of {len(polygons)} objects "
                          f"are box lines ('cls cx cy w h') without a polygon; their masks are the "
                          f"filled boxes")
        self.num_background = background
        if background:
            note_once(f"{self.source}: {len(files)} images, {background} without a label file "
                      f"(background images: no objects)")
        expected = {label_of(f) for f in files}
        self.orphan_labels = sorted(p for d in label_dirs if d.is_dir() for p in d.rglob("*.txt")
                                    if p not in expected and p.name != "classes.txt")
        if self.orphan_labels:
            warn_once(f"{self.source}: {len(self.orphan_labels)} label files have no image, e.g. "
                      f"{', '.join(map(str, self.orphan_labels[:3]))}")

    def _record(self, k: int, file: Path, txt: Path, checker: BoxChecker) -> ImageRecord:
        height, width = image_size(file)
        polygons: list[np.ndarray | None] = []
        if txt.is_file():
            labels, boxes, polygons = parse_yolo_objects(txt, len(self.class_names))
        else:
            labels, boxes = np.zeros(0, np.int64), np.zeros((0, 4))
        boxes = boxes * np.array([width, height, width, height], np.float64)
        names = [f"{txt}:box {i}" for i in range(len(labels))]
        boxes, keep = checker(boxes, height, width, names)
        # Kept for every split (not only with instance_masks): the ground truth of a segm
        # evaluation on the val split needs them. Pixel-edge coordinates; None: a box line.
        size = np.array([width, height], np.float64)
        polygons = [None if p is None else p * size for p, k in zip(polygons, keep) if k]
        return ImageRecord(image_id=k + 1, file=file, height=height, width=width, boxes=boxes[keep],
                           labels=labels[keep], iscrowd=np.zeros(int(keep.sum()), bool),
                           extra={"polygons": polygons})

    @staticmethod
    def _outlines(record: ImageRecord) -> list[np.ndarray]:
        """Float[P,2] pixel polygons of the record's objects, a box line's as its 4 corners."""
        return [p if p is not None else box[[0, 1, 2, 1, 2, 3, 0, 3]].reshape(4, 2)
                for p, box in zip(record.extra["polygons"], record.boxes.astype(np.float64))]

    def load_extra(self, record: ImageRecord, raw: dict) -> None:
        if self.instance_masks:
            raw["masks"] = polygon_masks(self._outlines(record), record.height, record.width)

    def coco_gt(self):
        """Boxes as the base class; with polygon lines in the data also their ``segmentation``
        and mask ``area`` (COCO's size ranges use it), so ``iou_types: [bbox, segm]`` scores."""
        coco = super().coco_gt()
        if not any(p is not None for r in self.records for p in r.extra["polygons"]):
            return coco
        from pycocotools import mask as mask_utils

        outlines = [(r, o, box) for r in self.records for o, box in zip(self._outlines(r), r.boxes)]
        for ann, (record, outline, box) in zip(coco.dataset["annotations"], outlines):
            # Clipped as polygon_masks clips, so the evaluator rasterises the training pixels.
            outline = clip_for_rasterising(outline, record.height, record.width)
            if len(outline) < 3:
                outline = box.astype(np.float64)[[0, 1, 2, 1, 2, 3, 0, 3]].reshape(4, 2)
            ann["segmentation"] = [outline.reshape(-1).tolist()]
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], record.height, record.width))
            ann["area"] = float(mask_utils.area(rle))
        return make_coco(coco.dataset)
