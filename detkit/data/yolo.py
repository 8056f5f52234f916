"""YOLO txt labels: one ``images/x.jpg`` -> ``labels/x.txt`` with lines ``cls cx cy w h``.

Coordinates are normalised to [0, 1] by the image width / height (of the image as displayed,
EXIF orientation applied). A line with more than five numbers is a polygon ``cls x1 y1 x2 y2 ...``
and becomes its bounding box. An image without a label file has no objects; a label file without
an image is reported in one warning. Labels are the class indices; ``label_to_cat_id`` is
``label + 1``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..registry import DATASETS
from .base import BoxChecker, DetectionDataset, ImageRecord, resolve_path
from .io import image_size

__all__ = ["YoloDetection", "IMAGE_EXTENSIONS", "parse_yolo_txt"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def parse_yolo_txt(txt: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels Int64[N] and normalised boxes Float[N,4] xyxy of one label file."""
    labels, boxes = [], []
    for lineno, line in enumerate(txt.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = int(float(parts[0])), [float(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{txt}:{lineno}: not numbers: {line.strip()!r}") from None
        if float(parts[0]) != cls or not 0 <= cls < num_classes:
            raise ValueError(f"{txt}:{lineno}: class index {parts[0]} is outside 0..{num_classes - 1} "
                             f"(the {num_classes} class_names)")
        if len(values) == 4:
            cx, cy, w, h = values
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
        else:
            raise ValueError(f"{txt}:{lineno}: expected 'cls cx cy w h' or 'cls x1 y1 x2 y2 ...', "
                             f"got {len(parts)} values")
        labels.append(cls)
    return np.array(labels, np.int64), np.array(boxes, np.float64).reshape(-1, 4)


@DATASETS.register()
class YoloDetection(DetectionDataset):
    """Images under ``img_dir`` (searched recursively) and labels under ``label_dir`` (same relative
    path, ``.txt``), both relative to ``root``; ``class_names`` lists the classes in index order."""

    def __init__(self, img_dir: str, label_dir: str, class_names: list[str], *, root: str | None = None,
                 transforms=None, filter_empty: bool = False, skip_bad_images: bool = False):
        super().__init__(transforms=transforms, skip_bad_images=skip_bad_images)
        self.img_dir = resolve_path(root, img_dir)
        self.label_dir = resolve_path(root, label_dir)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"YoloDetection: image folder not found: {self.img_dir}")
        if not self.label_dir.is_dir():
            raise FileNotFoundError(f"YoloDetection: label folder not found: {self.label_dir}")
        self.class_names = [str(n) for n in class_names]
        self.label_to_cat_id = list(range(1, len(self.class_names) + 1))
        files = sorted(p for p in self.img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        checker = BoxChecker(str(self.label_dir))
        self.records = [self._record(k, f, checker) for k, f in enumerate(files)]
        self.box_report = checker.report()
        self.orphan_labels = self._orphans(files)
        if self.orphan_labels:
            warnings.warn(f"{self.label_dir}: {len(self.orphan_labels)} label files have no image in "
                          f"{self.img_dir}, e.g. {', '.join(map(str, self.orphan_labels[:3]))}", stacklevel=2)
        if filter_empty:
            self.filter_empty_records()

    def _label_file(self, image: Path) -> Path:
        return (self.label_dir / image.relative_to(self.img_dir)).with_suffix(".txt")

    def _record(self, k: int, file: Path, checker: BoxChecker) -> ImageRecord:
        height, width = image_size(file)
        txt = self._label_file(file)
        if txt.is_file():
            labels, boxes = parse_yolo_txt(txt, len(self.class_names))
        else:
            labels, boxes = np.zeros(0, np.int64), np.zeros((0, 4))
        boxes = boxes * np.array([width, height, width, height], np.float64)
        names = [f"{txt}:box {i}" for i in range(len(labels))]
        boxes, keep = checker(boxes, height, width, names)
        return ImageRecord(image_id=k + 1, file=file, height=height, width=width, boxes=boxes[keep],
                           labels=labels[keep], iscrowd=np.zeros(int(keep.sum()), bool))

    def _orphans(self, files: list[Path]) -> list[Path]:
        expected = {self._label_file(f) for f in files}
        return sorted(p for p in self.label_dir.rglob("*.txt") if p not in expected and p.name != "classes.txt")
