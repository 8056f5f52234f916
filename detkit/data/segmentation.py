"""Semantic segmentation: image folder + PNG mask folder (VOC ``SegmentationClass`` layout).

A mask pixel value ``v`` is the class ``class_names[v]`` (so ``class_names`` normally starts
with ``background``); ``ignore_index`` (255 by default: VOC's object borders) is never trained on
nor scored. Set it once for the whole config as ``data.ignore_index`` (``detkit.config`` copies it
here, to the segmentation head and to the evaluator). Palette PNGs (VOC) are read as their
palette indices, not their colours. Works for the built-in shapes masks with
``class_names: [background, circle, square, triangle, star]``. Samples carry ``sem_seg``
Int64[H,W] and an empty ``boxes`` Float[0,4].

Sparse ids (e.g. PNG values ``0, 7, 26``, or COCO panoptic semantic PNGs with category ids
1..200 and gaps): give the classes with their values, ``classes: {0: background, 7: road, 26:
car}`` or ``classes: path/to/file`` (a yaml / json / txt of them, or COCO panoptic's categories
json; ``detkit.data.seg_classes``), or list the ids in class order as ``mask_values`` beside
``class_names``. Mask value ``mask_values[k]`` becomes class ``k``, any value not listed becomes
``ignore_index``. ``label_to_cat_id`` holds the values (stored in checkpoints), so
``tools/infer.py`` writes predicted PNGs in the dataset's own values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetError, warn_once
from ..registry import DATASETS, ConfigError
from .base import DetectionDataset, ImageRecord, require_dir, require_file, resolve_path
from .io import IMAGE_EXTENSIONS, image_size, read_image, read_mask
from .seg_classes import read_seg_classes

__all__ = ["SemanticSegDataset", "VOC_SEG_CLASSES"]

VOC_SEG_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                   "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                   "sheep", "sofa", "train", "tvmonitor"]
IGNORE = 255


@DATASETS.register()
class SemanticSegDataset(DetectionDataset):
    """Pairs ``img_dir/<stem>.<jpg|png|...>`` with ``mask_dir/<stem><mask_suffix>``.

    Args:
        split_file: optional text file listing the stems to use (VOC ``ImageSets/Segmentation/
            train.txt``); by default every image of ``img_dir`` that has a mask.
        class_names: names indexed by class (default: background + the 20 VOC classes).
        ignore_index: the mask value that is ignored (usually set as ``data.ignore_index``).
        mask_values: the mask value of each class, for sparse ids (default: ``v`` is class ``v``).
        classes: instead of ``class_names`` (+ ``mask_values``): ``{value: name}`` or a file of
            them (``read_seg_classes``; relative to ``root``); classes in ascending value order.

    Images without a mask are left out with one warning that counts them.
    """

    def __init__(self, img_dir: str, mask_dir: str, class_names: list[str] | None = None, *,
                 root: str | None = None, split_file: str | None = None, mask_suffix: str = ".png",
                 ignore_index: int = IGNORE, mask_values: list[int] | None = None,
                 classes: dict | str | None = None, transforms=None, skip_bad_images: bool = False):
        super().__init__(transforms=transforms, skip_bad_images=skip_bad_images)
        self.img_dir = require_dir(resolve_path(root, img_dir), "SemanticSegDataset: image folder")
        self.mask_dir = require_dir(resolve_path(root, mask_dir), "SemanticSegDataset: mask folder")
        self.ignore_index = int(ignore_index)
        if classes is not None:
            if class_names is not None or mask_values is not None:
                raise ConfigError("SemanticSegDataset: give classes ({value: name} or a file) or "
                                  "class_names (+ mask_values), not both")
            mask_values, class_names = read_seg_classes(classes, root=root)
            if self.ignore_index in mask_values:
                raise DatasetError(f"SemanticSegDataset: classes list the ignore value {self.ignore_index} "
                                   f"({class_names[mask_values.index(self.ignore_index)]!r}); leave it "
                                   f"out or set data.ignore_index to another value")
        self.class_names = list(class_names or VOC_SEG_CLASSES)
        self._lut = self._lookup_table(mask_values)
        # The mask value of each class: checkpoints store it, predictions are written back in it.
        self.mask_values = [int(v) for v in mask_values] if mask_values is not None \
            else list(range(len(self.class_names)))
        self.label_to_cat_id = list(self.mask_values)
        images: dict[str, Path] = {}
        for p in sorted(self.img_dir.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                images.setdefault(p.stem, p)
        if split_file is not None:
            split_path = require_file(resolve_path(root, split_file), "SemanticSegDataset: split file")
            stems = [ln.split()[0] for ln in split_path.read_text().splitlines() if ln.strip()]
            for stem in stems:
                if stem not in images:
                    raise DatasetError(f"SemanticSegDataset: {split_path} lists '{stem}', which has no "
                                       f"image in {self.img_dir}")
        else:
            stems = sorted(images)
        with_mask = [s for s in stems if (self.mask_dir / f"{s}{mask_suffix}").is_file()]
        if len(with_mask) < len(stems):
            kept = set(with_mask)
            missing = [images[s].name for s in stems if s not in kept]
            warn_once(f"SemanticSegDataset: {len(missing)} of {len(stems)} images of {self.img_dir} have "
                      f"no mask {mask_suffix} in {self.mask_dir} and are left out, e.g. "
                      f"{', '.join(missing[:3])}")
        self.records = [ImageRecord(
            image_id=k + 1, file=images[stem], height=0, width=0, boxes=np.zeros((0, 4), np.float32),
            labels=np.zeros(0, np.int64), iscrowd=np.zeros(0, bool),
            extra={"mask": self.mask_dir / f"{stem}{mask_suffix}"}) for k, stem in enumerate(with_mask)]

    def _lookup_table(self, mask_values: list[int] | None) -> np.ndarray | None:
        """UInt8[256] mask value -> class index (unlisted -> ignore), or None for the identity."""
        if mask_values is None:
            return None
        values = [int(v) for v in mask_values]
        if (len(values) != len(self.class_names) or len(set(values)) != len(values)
                or not all(0 <= v <= 255 for v in values)):
            raise DatasetError(f"SemanticSegDataset: mask_values must give one distinct value 0..255 per "
                               f"class ({len(self.class_names)} class_names), got {values}")
        lut = np.full(256, self.ignore_index, np.uint8)
        lut[values] = np.arange(len(values), dtype=np.uint8)
        return lut

    @property
    def seg_class_names(self) -> list[str]:
        return list(self.class_names)

    def aspect_ratios(self) -> list[float]:
        # Sizes are read lazily (header only) the first time grouping asks for them.
        for r in self.records:
            if not r.height:
                r.height, r.width = image_size(r.file)
        return super().aspect_ratios()

    def read(self, record: ImageRecord) -> np.ndarray:
        image = read_image(record.file)
        record.height, record.width = image.shape[:2]
        return image

    def load_extra(self, record: ImageRecord, raw: dict) -> None:
        mask_file = record.extra["mask"]
        mask = read_mask(mask_file)
        if mask.shape != raw["image"].shape[:2]:
            raise DatasetError(f"{mask_file}: mask is {mask.shape} (HxW) but image {record.file} is "
                               f"{raw['image'].shape[:2]}")
        if self._lut is not None:
            mask = self._lut[mask]
        values = np.unique(mask)
        bad = values[(values >= len(self.class_names)) & (values != self.ignore_index)]
        if bad.size:
            raise DatasetError(f"{mask_file}: mask values {bad.tolist()} are not class indices "
                               f"0..{len(self.class_names) - 1} (or {self.ignore_index} = ignore); "
                               f"for sparse ids give classes: {{value: name, ...}} (or mask_values)")
        raw["sem_seg"] = mask

    def coco_gt(self):
        raise NotImplementedError("SemanticSegDataset has no boxes; evaluate it with SegEvaluator")
