"""Generated COCO-style ground truth and detections for evaluator tests and benchmarks.

The case resembles a COCO val split: images of varied size, a few to a few dozen objects each
(about 40% small, 35% medium, 25% large), ~1% crowd regions, sparse category ids; detections are
jittered copies of most objects (score rising with the overlap), duplicates, label confusions and
false positives, so every branch of the matcher (crowd, duplicate, area ranges, maxDets) is hit.
With ``masks=True`` every object and detection also has a polygon (an ellipse inscribed in its
box): ground truth keeps the polygon, detections carry its compressed RLE (str counts).

Legend: N objects, D detections.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

__all__ = ["synthetic_coco", "results_to_predictions"]

_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (320, 240)]


def _random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """Float[N,4] xywh inside the image with COCO-like areas (sqrt area log-uniform 6..420 px)."""
    side = np.exp(rng.uniform(np.log(6), np.log(420), n))
    aspect = np.exp(rng.normal(0, 0.5, n))
    w = np.clip(side * np.sqrt(aspect), 2, width - 1)
    h = np.clip(side / np.sqrt(aspect), 2, height - 1)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x, y, w, h], 1).astype(np.float32).astype(np.float64)


def _ellipse(box: np.ndarray, points: int = 12) -> list[list[float]]:
    x, y, w, h = box
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    px, py = x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))
    return [np.round(np.stack([px, py], 1).reshape(-1), 2).tolist()]


def _detections(rng: np.random.Generator, gt_boxes: np.ndarray, gt_cats: np.ndarray,
                cat_ids: np.ndarray, width: int, height: int, false_positives: int):
    """(boxes Float[D,4] xywh, scores Float[D], category ids Int[D]) for one image."""
    hit = rng.random(len(gt_boxes)) < 0.85
    copies = np.where(hit, rng.integers(1, 3, len(gt_boxes)), 0)  # some get a duplicate
    src = np.repeat(np.arange(len(gt_boxes)), copies)
    base = gt_boxes[src]
    noise = rng.normal(0, 1, (len(src), 4)) * rng.uniform(0.01, 0.15, (len(src), 1))
    boxes = base + noise * base[:, [2, 3, 2, 3]]
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
    quality = np.exp(-np.abs(noise).mean(1) * 8)
    scores = np.clip(quality * rng.uniform(0.5, 1.0, len(src)), 0.01, 1.0)
    cats = gt_cats[src].copy()
    confused = rng.random(len(src)) < 0.1
    cats[confused] = rng.choice(cat_ids, int(confused.sum()))
    fp = _random_boxes(rng, false_positives, width, height)
    boxes = np.concatenate([boxes, fp])
    scores = np.concatenate([scores, rng.uniform(0.0, 0.6, false_positives)])
    cats = np.concatenate([cats, rng.choice(cat_ids, false_positives)])
    # xyxy corners as float32 numbers, so that tensors of the corners give back exactly these xywh
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1).astype(np.float32)
    xyxy = xyxy.astype(np.float64)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
    return xywh, scores.astype(np.float32).astype(np.float64), cats


def synthetic_coco(num_images: int, *, num_categories: int = 80, dets_per_image: int = 50,
                   masks: bool = False, seed: int = 0) -> tuple[dict, list[dict]]:
    """(ground-truth COCO dict, list of COCO result dicts) of a generated val split.

    Category ids are sparse (1, 3, 5 ...). ``dets_per_image`` is the mean number of detections per
    image (false positives fill up what the object copies leave). Every 10th image has no
    objects and one image in 25 gets no detections, as real splits have. Detection corners
    (x, y, x + w, y + h) and scores are float32 numbers: float32 tensors of them are the same detections.
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.arange(1, 2 * num_categories, 2)
    images: list[dict] = []
    anns: list[dict] = []
    results: list[dict] = []
    for image_id in range(1, num_images + 1):
        width, height = _SIZES[int(rng.integers(len(_SIZES)))]
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        n = 0 if image_id % 10 == 0 else int(rng.integers(1, 2 * 7))
        boxes = _random_boxes(rng, n, width, height)
        cats = rng.choice(cat_ids, n)
        crowd = rng.random(n) < 0.01
        for box, cat, is_crowd in zip(boxes, cats, crowd):
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": int(cat),
                   "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(is_crowd)}
            if masks:
                ann["segmentation"] = _ellipse(box)
                ann["area"] = float(mask_utils.area(mask_utils.frPyObjects(ann["segmentation"], height,
                                                                           width))[0])
            anns.append(ann)
        if image_id % 25 == 7:
            continue
        false_positives = max(0, int(rng.poisson(dets_per_image)) - int(1.35 * n))
        d_boxes, d_scores, d_cats = _detections(rng, boxes, cats, cat_ids, width, height, false_positives)
        for box, score, cat in zip(d_boxes, d_scores, d_cats):
            res = {"image_id": image_id, "category_id": int(cat), "bbox": box.tolist(), "score": float(score)}
            if masks:
                rle = mask_utils.frPyObjects(_ellipse(box), height, width)[0]
                res["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(res)
    categories = [{"id": int(c), "name": f"class{int(c)}", "supercategory": "thing"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": categories}, results


def results_to_predictions(gt: dict, results: list[dict]) -> dict[int, dict]:
    """COCO results -> what a detector returns per image: ``{image_id: {boxes Float32[K,4] xyxy,
    scores Float32[K], labels Int64[K]}}`` with labels indexing the sorted GT category ids; every
    GT image gets an entry (empty tensors for images without detections)."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    label_of = {c: i for i, c in enumerate(cat_ids)}
    image_ids = np.array([r["image_id"] for r in results], np.int64)
    xywh = np.array([r["bbox"] for r in results], np.float64).reshape(-1, 4)
    xyxy = torch.from_numpy(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)).float()
    scores = torch.tensor([r["score"] for r in results], dtype=torch.float32)
    labels = torch.tensor([label_of[r["category_id"]] for r in results], dtype=torch.int64)
    order = np.argsort(image_ids, kind="stable")
    starts = np.searchsorted(image_ids[order], [img["id"] for img in gt["images"]], side="left")
    ends = np.searchsorted(image_ids[order], [img["id"] for img in gt["images"]], side="right")
    out = {}
    for img, a, b in zip(gt["images"], starts, ends):
        idx = torch.from_numpy(order[a:b])
        out[img["id"]] = {"boxes": xyxy[idx], "scores": scores[idx], "labels": labels[idx]}
    return out
