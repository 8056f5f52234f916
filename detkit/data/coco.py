"""COCO-format detection json (COCO 2017, the built-in shapes dataset, your own data).

COCO's sparse category ids (1..90 with gaps) map to contiguous labels 0..C-1 in ascending id
order; ``label_to_cat_id[label]`` maps back (for results json and evaluation). Boxes are
``[x, y, w, h]`` in the json and ``xyxy`` in samples. ``iscrowd`` (or ``ignore``) annotations are
kept with ``iscrowd=True``: never trained on as positives, used by evaluation.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..registry import DATASETS
from .base import BoxChecker, DetectionDataset, ImageRecord, require_dir, resolve_path
from .io import image_size
from .polygons import segmentation_mask

__all__ = ["CocoDetection", "load_coco"]


def load_coco(ann_file: Path):
    """pycocotools COCO object of a json file; errors name the file."""
    from pycocotools.coco import COCO
    if not Path(ann_file).is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{ann_file}: not a valid COCO detection json ({type(e).__name__}: {e})") from None


@DATASETS.register()
class CocoDetection(DetectionDataset):
    """Images in ``img_dir`` annotated by the COCO json ``ann_file`` (both relative to ``root``).

    Args:
        filter_empty: drop images without a single non-crowd box (for training).
        with_masks: add ``sem_seg`` UInt8[H,W] rasterised from the polygons / RLE
            (0 = background, label+1 for objects, 255 for crowd regions).
        instance_masks: add ``masks`` UInt8[N,H,W], one 0/1 mask per box (polygons, RLE and
            crowd RLE decoded; crowd masks stay with their ignored boxes), for Mask R-CNN. The
            json's polygons are the stored form: bitmaps exist only per loaded sample.
        skip_bad_images: replace unreadable images by the next one (counted) instead of raising.
    """

    def __init__(self, img_dir: str, ann_file: str, *, root: str | None = None, transforms=None,
                 filter_empty: bool = False, with_masks: bool = False, instance_masks: bool = False,
                 skip_bad_images: bool = False):
        super().__init__(transforms=transforms, skip_bad_images=skip_bad_images)
        self.img_dir = require_dir(resolve_path(root, img_dir), "CocoDetection: image folder")
        self.ann_file = resolve_path(root, ann_file)
        self.with_masks = bool(with_masks)
        self.instance_masks = bool(instance_masks)
        self.coco = load_coco(self.ann_file)
        cats = self.coco.cats
        self.label_to_cat_id = sorted(int(c) for c in cats)
        self.class_names = [str(cats[c].get("name", c)) for c in self.label_to_cat_id]
        self.cat_id_to_label = {c: i for i, c in enumerate(self.label_to_cat_id)}
        checker = BoxChecker(str(self.ann_file))
        self.records = [self._record(img_id, checker) for img_id in sorted(self.coco.imgs)]
        self.box_report = checker.report()
        if filter_empty:
            self.filter_empty_records()

    def _record(self, img_id: int, checker: BoxChecker) -> ImageRecord:
        info = self.coco.imgs[img_id]
        file = self.img_dir / info["file_name"]
        if info.get("height") and info.get("width"):
            height, width = int(info["height"]), int(info["width"])
        else:
            height, width = image_size(file)
        anns = self.coco.imgToAnns.get(img_id, [])
        boxes, labels, crowd, names = [], [], [], []
        for ann in anns:
            where = f"{self.ann_file}: annotation id {ann.get('id')} (image id {img_id})"
            if ann.get("category_id") not in self.cat_id_to_label:
                raise ValueError(f"{where}: category_id {ann.get('category_id')!r} is not in the "
                                 f"json's categories {self.label_to_cat_id}")
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
            x, y, w, h = (float(v) if v is not None else float("nan") for v in bbox)
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_id_to_label[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0)))
            names.append(f"annotation id {ann.get('id')} in {info['file_name']}")
        clipped, keep = checker(np.array(boxes, np.float64).reshape(-1, 4), height, width, names)
        ann_ids = [a.get("id") for a, k in zip(anns, keep) if k]
        return ImageRecord(image_id=int(img_id), file=file, height=height, width=width,
                           boxes=clipped[keep], labels=np.array(labels, np.int64).reshape(-1)[keep],
                           iscrowd=np.array(crowd, bool).reshape(-1)[keep], extra={"ann_ids": ann_ids})

    def load_extra(self, record: ImageRecord, raw: dict) -> None:
        if self.instance_masks:
            raw["masks"] = self._instance_masks(record)
        if not self.with_masks:
            return
        sem = np.zeros((record.height, record.width), np.uint8)
        anns = [self.coco.anns[i] for i in record.extra["ann_ids"] if "segmentation" in self.coco.anns[i]]
        # Paint large objects first so that smaller ones in front of them stay visible.
        for ann in sorted(anns, key=lambda a: -float(a.get("area", 0.0))):
            mask = self._mask(ann, record).astype(bool)
            if mask.shape != sem.shape:
                raise ValueError(f"{self.ann_file}: annotation id {ann.get('id')} mask is "
                                 f"{mask.shape} but image is {sem.shape}")
            crowd = ann.get("iscrowd", 0) or ann.get("ignore", 0)
            sem[mask] = 255 if crowd else self.cat_id_to_label[ann["category_id"]] + 1
        raw["sem_seg"] = sem

    def _instance_masks(self, record: ImageRecord) -> np.ndarray:
        """UInt8[N,H,W] masks of the record's boxes, in order (``ann_ids`` are the kept boxes')."""
        masks = np.zeros((len(record.extra["ann_ids"]), record.height, record.width), np.uint8)
        for i, ann_id in enumerate(record.extra["ann_ids"]):
            ann = self.coco.anns[ann_id]
            if not ann.get("segmentation"):
                raise ValueError(f"{self.ann_file}: annotation id {ann_id} (image id {record.image_id}) "
                                 f"has no 'segmentation'; instance_masks: true needs a polygon or RLE "
                                 f"for every annotation")
            mask = self._mask(ann, record)
            if mask.shape != masks.shape[1:]:
                raise ValueError(f"{self.ann_file}: annotation id {ann_id} mask is {mask.shape} but "
                                 f"image id {record.image_id} is {masks.shape[1:]}")
            masks[i] = mask
        return masks

    def _mask(self, ann: dict, record: ImageRecord) -> np.ndarray:
        """UInt8[H,W] of one annotation; polygons clipped first (``detkit.data.polygons``: huge
        coordinates crashed pycocotools), a malformed ``segmentation`` named."""
        try:
            return segmentation_mask(self.coco, ann, record.height, record.width)
        except (ValueError, TypeError, KeyError) as e:
            raise DatasetError(f"{self.ann_file}: annotation id {ann.get('id')} (image id "
                               f"{record.image_id}): unreadable 'segmentation' ({type(e).__name__}: {e})"
                               ) from None

    def coco_gt(self):
        """The json's own COCO object: official areas and crowd regions, original category ids."""
        return self.coco
