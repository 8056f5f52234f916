"""Semantic segmentation: image folder + PNG mask folder (VOC ``SegmentationClass`` layout).

A mask pixel value ``v`` is the class ``class_names[v]`` (so ``class_names`` normally starts
with ``background``); 255 is ignore (VOC's object borders). Palette PNGs (VOC) are read as their
palette indices, not their colours. Works for the built-in shapes masks with
``class_names: [background, circle, square, triangle, star]``. Samples carry ``sem_seg``
Int64[H,W] and an empty ``boxes`` Float[0,4].
"""

from __future__ import annotations

import numpy as np

from ..registry import DATASETS
from .base import DetectionDataset, ImageRecord, resolve_path
from .io import image_size, read_image, read_mask

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
            train.txt``); by default every mask in ``mask_dir``.
        class_names: names indexed by mask value (default: background + the 20 VOC classes).
    """

    def __init__(self, img_dir: str, mask_dir: str, class_names: list[str] | None = None, *,
                 root: str | None = None, split_file: str | None = None, mask_suffix: str = ".png",
                 transforms=None, skip_bad_images: bool = False):
        super().__init__(transforms=transforms, skip_bad_images=skip_bad_images)
        self.img_dir = resolve_path(root, img_dir)
        self.mask_dir = resolve_path(root, mask_dir)
        self.class_names = list(class_names or VOC_SEG_CLASSES)
        self.label_to_cat_id = list(range(len(self.class_names)))
        for folder in (self.img_dir, self.mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"SemanticSegDataset: folder not found: {folder}")
        if split_file is not None:
            split_path = resolve_path(root, split_file)
            if not split_path.is_file():
                raise FileNotFoundError(f"SemanticSegDataset: split file not found: {split_path}")
            stems = [ln.split()[0] for ln in split_path.read_text().splitlines() if ln.strip()]
        else:
            stems = sorted(p.name[: -len(mask_suffix)] for p in self.mask_dir.glob(f"*{mask_suffix}"))
        images = {}
        for p in self.img_dir.iterdir():
            images.setdefault(p.stem, p)
        self.records = []
        for k, stem in enumerate(stems):
            if stem not in images:
                raise FileNotFoundError(f"SemanticSegDataset: no image for mask "
                                        f"{self.mask_dir / (stem + mask_suffix)} in {self.img_dir}")
            self.records.append(ImageRecord(
                image_id=k + 1, file=images[stem], height=0, width=0, boxes=np.zeros((0, 4), np.float32),
                labels=np.zeros(0, np.int64), iscrowd=np.zeros(0, bool),
                extra={"mask": self.mask_dir / f"{stem}{mask_suffix}"}))

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
            raise ValueError(f"{mask_file}: mask is {mask.shape} (HxW) but image {record.file} is "
                             f"{raw['image'].shape[:2]}")
        values = np.unique(mask)
        bad = values[(values >= len(self.class_names)) & (values != IGNORE)]
        if bad.size:
            raise ValueError(f"{mask_file}: mask values {bad.tolist()} are not class indices "
                             f"0..{len(self.class_names) - 1} (or {IGNORE} = ignore)")
        raw["sem_seg"] = mask

    def coco_gt(self):
        raise NotImplementedError("SemanticSegDataset has no boxes; evaluate it with SegEvaluator")
