"""Pascal VOC detection (XML annotations) and the dataset concatenation used for VOC07+12.

Coordinate convention: VOC XML stores 1-based, inclusive pixel indices (``xmin=1`` is the first
column, ``xmax`` is the last column *inside* the box). detkit uses pixel-edge coordinates
starting at 0, so a VOC box becomes ``(xmin - 1, ymin - 1, xmax, ymax)``: its width is
``xmax - xmin + 1``, exactly the width the official VOC devkit uses, and a box over the whole
image is ``(0, 0, W, H)``. Labels are indices into ``class_names`` (the 20 VOC classes by
default); ``label_to_cat_id`` is ``label + 1``. Boxes marked ``<difficult>1</difficult>`` are kept
with ``difficult=True`` (never trained on as positives; ``coco_gt()`` marks them iscrowd so COCO
evaluation ignores them) unless ``keep_difficult=False`` drops them.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset as _TorchConcat

from ..registry import DATASETS, ConfigError
from .base import BoxChecker, DetectionDataset, ImageRecord, make_coco
from .io import image_size

__all__ = ["VOC_CLASSES", "VOCDetection", "ConcatDataset", "parse_voc_xml"]

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def _number(node, tag: str, xml_file: Path) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{xml_file}: <{tag}> is {text!r}, expected a number") from None


def _pixels(node, tag: str, xml_file: Path) -> int:
    value = _number(node, tag, xml_file)
    if not math.isfinite(value):   # int() would raise OverflowError for inf, not a ValueError
        raise ValueError(f"{xml_file}: <{tag}> is {value}, expected a size in pixels")
    return int(value)


def parse_voc_xml(xml_file: Path, class_index: dict[str, int]) -> dict:
    """One VOC XML -> ``size`` (H, W) or None, ``boxes`` Float[N,4] (0-based pixel edges),
    ``labels``, ``difficult``. An object whose class is not in ``class_index`` is an error."""
    try:
        root = ET.parse(xml_file).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"VOC annotation not found: {xml_file}") from None
    except ET.ParseError as e:
        raise ValueError(f"{xml_file}: malformed XML ({e})") from None
    size = root.find("size")
    hw = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        hw = (_pixels(size, "height", xml_file), _pixels(size, "width", xml_file))
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise ValueError(f"{xml_file}: object {i} has class '{name}', which is not one of the "
                             f"{len(class_index)} classes ({', '.join(class_index)})")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{xml_file}: object {i} ('{name}') has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bnd, t, xml_file) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(class_index[name])
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return {"size": hw, "boxes": np.array(boxes, np.float64).reshape(-1, 4),
            "labels": np.array(labels, np.int64), "difficult": np.array(difficult, bool)}


def _image_id(stem: str, fallback: int) -> int:
    # "000005" -> 5, "2008_000008" -> 2008000008: unique across VOC2007 and VOC2012.
    return int(stem.replace("_", "")) if re.fullmatch(r"[0-9_]+", stem) else fallback


@DATASETS.register()
class VOCDetection(DetectionDataset):
    """``{root}/VOC{year}/ImageSets/Main/{split}.txt`` with ``Annotations/*.xml`` and ``JPEGImages``.

    ``root`` is the VOCdevkit folder (``data.root`` by default). With ``year: null`` the root
    itself is the VOC-style folder (for your own data in VOC format).
    """

    def __init__(self, root: str | None = None, year: str | int | None = "2007", split: str = "trainval", *,
                 class_names: list[str] | None = None, keep_difficult: bool = True,
                 filter_empty: bool = False, img_ext: str = ".jpg", transforms=None,
                 skip_bad_images: bool = False):
        super().__init__(transforms=transforms, skip_bad_images=skip_bad_images)
        if root is None:
            raise ConfigError("VOCDetection: 'root' is not set (set data.root to the VOCdevkit folder)")
        self.base = Path(root).expanduser() / (f"VOC{year}" if year is not None else "")
        self.class_names = list(class_names or VOC_CLASSES)
        self.label_to_cat_id = list(range(1, len(self.class_names) + 1))
        index = {n: i for i, n in enumerate(self.class_names)}
        list_file = self.base / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"VOC split file not found: {list_file}")
        stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        checker = BoxChecker(str(self.base))
        self.records = []
        for k, stem in enumerate(stems):
            xml_file = self.base / "Annotations" / f"{stem}.xml"
            ann = parse_voc_xml(xml_file, index)
            file = self.base / "JPEGImages" / f"{stem}{img_ext}"
            height, width = ann["size"] or image_size(file)
            names = [f"{xml_file.name} object {i}" for i in range(len(ann["labels"]))]
            boxes, keep = checker(ann["boxes"], height, width, names)
            if not keep_difficult:
                keep &= ~ann["difficult"]
            self.records.append(ImageRecord(
                image_id=_image_id(stem, k + 1), file=file, height=height, width=width, boxes=boxes[keep],
                labels=ann["labels"][keep], iscrowd=np.zeros(int(keep.sum()), bool),
                difficult=ann["difficult"][keep]))
        self.box_report = checker.report()
        if filter_empty:
            self.filter_empty_records()


@DATASETS.register()
class ConcatDataset(_TorchConcat):
    """Several datasets with the same classes as one (VOC2007 trainval + VOC2012 trainval).

    Config: ``{type: ConcatDataset, datasets: [{type: VOCDetection, year: "2007", ...}, ...]}``;
    each child gets ``data.root`` and the split's pipeline.
    """

    # Children are any detkit datasets (DetectionDataset subclasses, SubsetDataset, Mosaic, ...),
    # which share no base class declaring get_raw / aspect_ratios / ...: duck-typed.
    datasets: list[Any]

    def __init__(self, datasets: list):
        super().__init__(datasets)
        first = datasets[0]
        for i, d in enumerate(datasets[1:], 1):
            if getattr(d, "class_names", None) != getattr(first, "class_names", None):
                raise ValueError(f"ConcatDataset: dataset {i} has classes {getattr(d, 'class_names', None)}, "
                                 f"dataset 0 has {getattr(first, 'class_names', None)}")
        self.class_names = list(first.class_names)
        self.label_to_cat_id = list(getattr(first, "label_to_cat_id", range(1, len(self.class_names) + 1)))

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, root=None, transforms=None) -> "ConcatDataset":
        from .builder import build_dataset_node
        children = cfg.get("datasets")
        if not isinstance(children, list) or not children:
            raise ConfigError(f"{path}.datasets: expected a non-empty list of dataset configs")
        extra = sorted(set(cfg) - {"datasets"})
        if extra:
            raise ConfigError(f"{path}.{extra[0]}: 'ConcatDataset' has no argument '{extra[0]}'; "
                              f"valid arguments: datasets")
        return cls([build_dataset_node(c, f"{path}.datasets.{i}", root=root, transforms=transforms)
                    for i, c in enumerate(children)])

    @property
    def seg_class_names(self) -> list[str]:
        return self.datasets[0].seg_class_names

    def _locate(self, index: int) -> tuple[Any, int]:
        if index < 0:
            index += len(self)
        k = int(np.searchsorted(self.cumulative_sizes, index, side="right"))
        return self.datasets[k], index - (self.cumulative_sizes[k - 1] if k else 0)

    def get_raw(self, index: int) -> dict:
        dataset, i = self._locate(index)
        return dataset.get_raw(i)

    def get_raw_checked(self, index: int) -> dict:
        dataset, i = self._locate(index)
        return dataset.get_raw_checked(i)

    def aspect_ratios(self) -> list[float]:
        return [a for d in self.datasets for a in d.aspect_ratios()]

    def coco_gt(self):
        """The children's ground truth merged; image ids must be unique across children."""
        images, annotations, seen = [], [], set()
        for k, d in enumerate(self.datasets):
            part = d.coco_gt().dataset
            for img in part["images"]:
                if img["id"] in seen:
                    raise ValueError(f"ConcatDataset: image id {img['id']} occurs in more than one dataset "
                                     f"(dataset {k}); evaluation needs unique ids")
                seen.add(img["id"])
                images.append(img)
            for ann in part["annotations"]:
                annotations.append(dict(ann, id=len(annotations) + 1))
        categories = [{"id": c, "name": n} for c, n in zip(self.label_to_cat_id, self.class_names)]
        return make_coco({"images": images, "annotations": annotations, "categories": categories})
