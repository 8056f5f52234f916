"""The COCOeval engines behind ``coco_evaluate``: faster-coco-eval (C++) and pycocotools.

Both receive the same ground truth and the same detection annotations and return the same
numbers: the 12 summary stats and the ``precision`` array [T,R,K,A,M] (IoU thresholds, recall
thresholds, categories, area ranges, max detections) equal to ~1e-16. ``faster`` is the default;
when ``faster_coco_eval`` cannot be imported, evaluation falls back to pycocotools with a warning;
so does an evaluation of detections with NaN or infinite scores or boxes (see ``run_cocoeval``).

Detections travel as a :class:`DetectionTable` (arrays, one row per detection) instead of a list of
dicts: ``COCOEvaluator.process`` fills it with tensor operations and one RLE ``encode`` call per
image, it pickles compactly across DDP ranks, and the annotation dicts the COCO APIs need are
built once, with the fields ``COCO.loadRes`` would add (``id`` 1..D in table order, ``area``,
``iscrowd`` 0; segm ``bbox`` from the masks), without the polygon ``loadRes`` adds to every box.

Legend: D detections.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["BACKENDS", "DetectionTable", "CocoEvalResult", "resolve_backend", "run_cocoeval", "gc_paused"]

BACKENDS = ("faster", "pycocotools")


def _faster_api() -> Any:
    """The ``faster_coco_eval`` module, or None when it cannot be imported."""
    try:
        return importlib.import_module("faster_coco_eval")
    except ImportError:
        return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while ~10^5 acyclic dicts are created.

    Every few hundred new containers the collector scans the young generation and, as survivors
    pile up, the older ones; with millions of live annotation objects that is a third of the
    evaluation time (measured: 10.5 s -> 7.1 s at 2,000 images). Nothing created here is cyclic.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def resolve_backend(backend: str) -> str:
    """``backend`` if usable; ``'faster'`` without faster-coco-eval falls back to pycocotools."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "faster" and _faster_api() is None:
        warnings.warn("faster-coco-eval is not importable; COCO evaluation falls back to pycocotools "
                      "(same numbers, ~10x slower): pip install faster-coco-eval", stacklevel=2)
        return "pycocotools"
    return backend


def rle_area(rles: list[dict]) -> np.ndarray:
    """Pixel counts Float64[D] of compressed RLEs.

    In chunks of 255: pycocotools 2.0.11 ``mask.area`` of a longer list fails with "Python integer
    256 out of bounds for uint8" under NumPy 2.
    """
    parts = [mask_utils.area(rles[i:i + 255]) for i in range(0, len(rles), 255)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


@dataclass
class DetectionTable:
    """Detections of many images: ``image_ids`` Int64[D], ``category_ids`` Int64[D], ``boxes``
    Float64[D,4] xywh in original pixels, ``scores`` Float64[D], ``rles`` D compressed RLEs or None."""

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    rles: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def concat(cls, parts: Sequence["DetectionTable"]) -> "DetectionTable":
        has_rles = bool(parts) and all(p.rles is not None for p in parts)
        return cls(np.concatenate([p.image_ids for p in parts]) if parts else np.zeros(0, np.int64),
                   np.concatenate([p.category_ids for p in parts]) if parts else np.zeros(0, np.int64),
                   np.concatenate([p.boxes for p in parts]) if parts else np.zeros((0, 4)),
                   np.concatenate([p.scores for p in parts]) if parts else np.zeros(0),
                   [r for p in parts for r in p.rles] if has_rles else None)  # type: ignore[union-attr]

    @classmethod
    def from_results(cls, results: list[dict], iou_type: str, source: str = "results") -> "DetectionTable":
        """From COCO result dicts (``image_id``, ``category_id``, ``score`` and ``bbox`` xywh or
        ``segmentation`` RLE); a missing or malformed field is a ValueError naming the detection."""
        needed = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
        try:
            image_ids = np.array([r["image_id"] for r in results], np.int64).reshape(-1)
            cats = np.array([r["category_id"] for r in results], np.int64).reshape(-1)
            scores = np.array([r["score"] for r in results], np.float64).reshape(-1)
            if iou_type == "bbox":
                boxes, rles = np.array([r["bbox"] for r in results], np.float64).reshape(-1, 4), None
            else:
                rles = [r["segmentation"] for r in results]
                boxes = mask_utils.toBbox(rles).reshape(-1, 4) if rles else np.zeros((0, 4))
        except (KeyError, TypeError, ValueError):
            for i, r in enumerate(results):
                if not isinstance(r, dict) or any(k not in r for k in needed):
                    raise ValueError(f"{source}: detection {i} lacks one of {', '.join(needed)}") from None
                if iou_type == "bbox" and np.asarray(r["bbox"]).shape != (4,):
                    raise ValueError(f"{source}: detection {i} bbox {r['bbox']} is not [x, y, w, h]") \
                        from None
            raise ValueError(f"{source}: detections with non-numeric or malformed fields") from None
        return cls(image_ids, cats, boxes, scores, rles)

    def annotations(self, iou_type: str) -> list[dict]:
        """The annotation dicts ``COCO.loadRes`` would make of these detections."""
        if iou_type == "segm":
            if self.rles is None:
                raise ValueError("segm evaluation needs masks in the detections")
            area = rle_area(self.rles)
        else:
            area = self.boxes[:, 2] * self.boxes[:, 3]
        columns = zip(range(1, len(self) + 1), self.image_ids.tolist(), self.category_ids.tolist(),
                      self.boxes.tolist(), self.scores.tolist(), area.tolist())
        anns = [{"id": i, "image_id": img, "category_id": c, "bbox": b, "score": s, "area": a, "iscrowd": 0}
                for i, img, c, b, s, a in columns]
        if iou_type == "segm":
            for ann, rle in zip(anns, self.rles):  # type: ignore[arg-type]
                ann["segmentation"] = rle
        return anns


@dataclass
class CocoEvalResult:
    """What both backends return: ``stats`` Float[12] (COCOeval.stats), ``precision``
    Float[T,R,K,A,M] (-1 where undefined), the thresholds and ``cat_ids`` (the K axis)."""

    stats: np.ndarray
    precision: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    cat_ids: list[int]


def check_gt_annotations(coco_gt: COCO) -> None:
    """pycocotools needs ``area`` and ``iscrowd`` on every ground-truth annotation (KeyError
    otherwise) while faster-coco-eval guesses them; detkit follows pycocotools with one clear error."""
    for ann in coco_gt.dataset.get("annotations", []):
        missing = [k for k in ("area", "iscrowd", "bbox", "category_id", "image_id", "id") if k not in ann]
        if missing:
            raise ValueError(f"ground-truth annotation id {ann.get('id')} (image {ann.get('image_id')}) "
                             f"lacks {', '.join(missing)}")


# faster-coco-eval ground truth per pycocotools ground truth: built once, reused by every evaluate().
_FASTER_GT: "weakref.WeakKeyDictionary[COCO, tuple[dict, Any]]" = weakref.WeakKeyDictionary()


def _faster_gt(api: Any, coco_gt: COCO) -> Any:
    data = coco_gt.dataset
    cached = _FASTER_GT.get(coco_gt)
    if cached is not None and cached[0] is data:
        return cached[1]
    # Copies of the annotation dicts: faster-coco-eval stores RLEs ('rle') in them while evaluating.
    gt = api.COCO(print_function=lambda *a: None)
    gt.dataset = {"images": data.get("images", []), "categories": data.get("categories", []),
                  "annotations": [dict(a) for a in data.get("annotations", [])]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about annotation id 0 applies to pycocotools too
        gt.createIndex()
    _FASTER_GT[coco_gt] = (data, gt)
    return gt


def _detections_coco(coco_cls: type, coco_gt: COCO, annotations: list[dict], **kwargs) -> Any:
    dt = coco_cls(**kwargs)
    dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                  "categories": list(coco_gt.dataset.get("categories", [])), "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def run_cocoeval(coco_gt: COCO, detections: DetectionTable, iou_type: str,
                 img_ids: Sequence[int] | None = None, backend: str = "faster") -> CocoEvalResult:
    """Evaluate ``detections`` against ``coco_gt`` (all its images, or ``img_ids``)."""
    backend = resolve_backend(backend)
    check_gt_annotations(coco_gt)
    finite = np.isfinite(detections.scores).all() and np.isfinite(detections.boxes).all()
    if backend == "faster" and not finite:
        # faster-coco-eval raises on NaN scores and scores NaN/inf boxes differently from
        # pycocotools (AP 0.21 apart in a test); detkit's numbers are pycocotools' in that case.
        warnings.warn("detections with NaN/inf scores or boxes: evaluated with pycocotools", stacklevel=2)
        backend = "pycocotools"
    with gc_paused():
        return _run(coco_gt, detections.annotations(iou_type), iou_type, img_ids, backend)


def _run(coco_gt: COCO, annotations: list[dict], iou_type: str, img_ids: Sequence[int] | None,
         backend: str) -> CocoEvalResult:
    silent = lambda *args, **kwargs: None  # noqa: E731 - the libraries' progress chatter
    if backend == "faster":
        api = _faster_api()
        gt = _faster_gt(api, coco_gt)
        dt = _detections_coco(api.COCO, coco_gt, annotations, print_function=silent)
        coco_eval = api.COCOeval_faster(gt, dt, iou_type, print_function=silent)
    else:
        dt = _detections_coco(COCO, coco_gt, annotations)
        coco_eval = COCOeval(coco_gt, dt, iou_type)
    if img_ids is not None:
        coco_eval.params.imgIds = sorted(int(i) for i in img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    p = coco_eval.params
    return CocoEvalResult(np.asarray(coco_eval.stats[:12], np.float64),
                          np.asarray(coco_eval.eval["precision"]), np.asarray(p.iouThrs),
                          np.asarray(p.recThrs), [int(c) for c in p.catIds])
