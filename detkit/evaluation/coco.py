"""COCO-style evaluation: bbox (and optionally segm) AP/AR, per class.

Predictions arrive as the model returns them: ``boxes`` Float[K,4] xyxy in original-image pixels,
``scores`` Float[K], ``labels`` Int64[K] contiguous in 0..C-1, optional ``masks`` [K,H0,W0]
(bool, or float probabilities thresholded at 0.5). They become rows of a ``DetectionTable``
(``bbox`` xywh, original category ids, RLEs) and are scored by faster-coco-eval's C++ COCOeval
or by pycocotools' ``COCOeval`` (``backend``, see ``coco_backends``); the 12 numbers of
``COCOeval.stats`` are reported unchanged and equal for both.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..registry import EVALUATORS, ConfigError, construct
from . import _dist
from .coco_backends import BACKENDS, CocoEvalResult, DetectionTable, gc_paused, run_cocoeval
from .report import per_class_table, safe_filename, save_pr_curve

__all__ = ["COCOEvaluator", "STAT_NAMES", "load_coco", "coco_evaluate", "evaluate_coco_files",
           "dataset_coco_gt", "summary_text"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_coco(ann: str | Path | dict | COCO) -> COCO:
    """A pycocotools COCO from a json path, a parsed json dict or an existing COCO (kept)."""
    if isinstance(ann, COCO):
        return ann
    if isinstance(ann, dict):
        coco = COCO()
        coco.dataset = ann
    else:
        path = Path(ann)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        try:
            with gc_paused():
                data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid json: {e}") from None
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{path}: not a COCO annotation file (needs 'images', 'annotations', "
                             f"'categories')")
        coco = COCO()
        coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


_SUMMARY = [("Precision", "0.50:0.95", "all", 100), ("Precision", "0.50", "all", 100),
            ("Precision", "0.75", "all", 100), ("Precision", "0.50:0.95", "small", 100),
            ("Precision", "0.50:0.95", "medium", 100), ("Precision", "0.50:0.95", "large", 100),
            ("Recall", "0.50:0.95", "all", 1), ("Recall", "0.50:0.95", "all", 10),
            ("Recall", "0.50:0.95", "all", 100), ("Recall", "0.50:0.95", "small", 100),
            ("Recall", "0.50:0.95", "medium", 100), ("Recall", "0.50:0.95", "large", 100)]


def summary_text(stats: Sequence[float] | np.ndarray) -> str:
    """The 12 lines ``COCOeval.summarize()`` prints, for either backend."""
    return "\n".join(f" {'Average ' + kind:<18} {'(AP)' if kind == 'Precision' else '(AR)'} "
                     f"@[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = {value:0.3f}"
                     for (kind, iou, area, dets), value in zip(_SUMMARY, stats))


def _per_class_ap(result: CocoEvalResult, iou: float | None = None) -> list[float]:
    """AP per category (order of ``result.cat_ids``), area 'all', max dets 100; NaN without GT."""
    precision = result.precision  # [T iou thrs, R recall thrs, K cats, A areas, M max dets]
    if iou is not None:
        precision = precision[np.isclose(result.iou_thrs, iou)]
    out = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out.append(float(p.mean()) if p.size else float("nan"))
    return out


def coco_evaluate(coco_gt: COCO, results: list[dict] | DetectionTable, iou_type: str = "bbox",
                  img_ids: Sequence[int] | None = None, cat_names: dict[int, str] | None = None,
                  pr_curve_dir: str | Path | None = None,
                  backend: str = "faster") -> tuple[dict[str, float], str]:
    """COCOeval of ``results`` (COCO result dicts or a DetectionTable); returns (metrics, report).

    Metrics: ``<iou_type>/AP`` ... ``/ARl`` (COCOeval.stats) and ``<iou_type>/AP-<class>``.
    ``img_ids`` restricts evaluation to those images (default: every ground-truth image).
    ``backend``: ``faster`` (faster-coco-eval, falls back to pycocotools) or ``pycocotools``.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    table = results if isinstance(results, DetectionTable) else DetectionTable.from_results(results, iou_type)
    unknown = set(np.unique(table.image_ids).tolist()) - set(coco_gt.imgs)
    if unknown:
        raise ValueError(f"results refer to image ids not in the ground truth: {sorted(unknown)[:10]}")
    result = run_cocoeval(coco_gt, table, iou_type, img_ids, backend)
    metrics = {f"{iou_type}/{n}": float(v) for n, v in zip(STAT_NAMES, result.stats)}
    cat_names = cat_names or {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    names = [cat_names.get(c, str(c)) for c in result.cat_ids]
    ap, ap50 = _per_class_ap(result), _per_class_ap(result, 0.5)
    for name, value in zip(names, ap):
        metrics[f"{iou_type}/AP-{name}"] = value
    table_text = per_class_table({"AP": dict(zip(names, ap)), "AP50": dict(zip(names, ap50))}, names)
    if pr_curve_dir is not None:
        _save_coco_pr_curves(result, names, Path(pr_curve_dir), iou_type)
    report = f"COCO {iou_type} evaluation\n{summary_text(result.stats)}\n\n{table_text}"
    return metrics, report


def _save_coco_pr_curves(result: CocoEvalResult, names: list[str], out_dir: Path, iou_type: str,
                         ious: Sequence[float] = (0.5, 0.75)) -> None:
    """One PNG per class: precision over recall at each IoU of ``ious`` (area all, 100 dets)."""
    for k, name in enumerate(names):
        curves = {}
        for iou in ious:
            t = np.flatnonzero(np.isclose(result.iou_thrs, iou))
            p = result.precision[t[0], :, k, 0, -1] if t.size else np.array([-1.0])
            if (p > -1).any():
                curves[f"IoU={iou:.2f}"] = (result.rec_thrs, np.clip(p, 0, None))
        save_pr_curve(curves, f"{iou_type} {name}", out_dir / f"{iou_type}_pr_{safe_filename(name)}.png")


def evaluate_coco_files(gt_json: str | Path, dt_json: str | Path, iou_type: str = "bbox",
                        backend: str = "faster") -> tuple[dict[str, float], str]:
    """Score a COCO results json against an annotation json (no model); returns (metrics, report)."""
    coco_gt = load_coco(gt_json)
    path = Path(dt_json)
    if not path.is_file():
        raise FileNotFoundError(f"COCO results file not found: {path}")
    try:
        with gc_paused():
            results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid json: {e}") from None
    if not isinstance(results, list):
        raise ValueError(f"{path}: a COCO results file is a json list of detections")
    table = DetectionTable.from_results(results, iou_type, source=str(path))
    del results  # ~10^5 dicts; the table holds the same numbers
    return coco_evaluate(coco_gt, table, iou_type, backend=backend)


def dataset_coco_gt(dataset, path: str) -> COCO:
    """``dataset.coco_gt()``, as a ConfigError when the dataset has no detection ground truth."""
    try:
        return dataset.coco_gt()
    except NotImplementedError as e:
        raise ConfigError(f"{path}: the val dataset {type(dataset).__name__} has no box ground truth "
                          f"({e}); use an evaluator that fits it (SegEvaluator for masks)") from None


def _encode_masks(masks: torch.Tensor) -> list[dict]:
    """[K,H,W] (or [K,1,H,W]) bool/probability masks -> K compressed RLEs (one C call)."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.is_floating_point():
        masks = masks > 0.5
    return mask_utils.encode(np.asfortranarray(masks.to(torch.uint8).permute(1, 2, 0).cpu().numpy()))


@EVALUATORS.register()
class COCOEvaluator:
    """COCO AP/AR of detections, DDP-aware (every rank returns the same dict).

    Args:
        ann_file: ground truth as a COCO json path or a ``pycocotools.coco.COCO`` object
            (``build_evaluator`` uses ``dataset.coco_gt()`` when the config gives none).
        label_to_cat_id: category id of each contiguous label (default: sorted GT category ids).
        class_names: names for the per-class keys (default: the GT category names).
        iou_types: ``("bbox",)`` or ``("bbox", "segm")`` (segm needs ``masks`` in predictions).
        pr_curve_dir: if set, PR-curve PNGs per class (IoU 0.5 and 0.75) are written there.
        backend: ``faster`` (faster-coco-eval's C++ COCOeval; pycocotools when it is not
            installed) or ``pycocotools``; both give the same numbers.
    """

    def __init__(self, *, ann_file: str | COCO, label_to_cat_id: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None, iou_types: Sequence[str] = ("bbox",),
                 pr_curve_dir: str | None = None, backend: str = "faster"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.coco_gt = load_coco(ann_file)
        cat_ids = sorted(self.coco_gt.getCatIds())
        self.label_to_cat_id = [int(c) for c in (label_to_cat_id if label_to_cat_id is not None else cat_ids)]
        missing = set(self.label_to_cat_id) - set(cat_ids)
        if missing:
            raise ValueError(f"label_to_cat_id has category ids {sorted(missing)} that the ground "
                             f"truth does not define (it has {cat_ids})")
        self._cat_of_label = np.asarray(self.label_to_cat_id, np.int64)
        self.iou_types = tuple(iou_types)
        for t in self.iou_types:
            if t not in ("bbox", "segm"):
                raise ValueError(f"iou_types: unknown '{t}' (use 'bbox' and/or 'segm')")
        gt_names = {c["id"]: c["name"] for c in self.coco_gt.loadCats(cat_ids)}
        if class_names is not None:
            if len(class_names) != len(self.label_to_cat_id):
                raise ValueError(f"{len(class_names)} class_names for {len(self.label_to_cat_id)} labels")
            gt_names.update(zip(self.label_to_cat_id, class_names))
        self.cat_names = gt_names
        self.pr_curve_dir = pr_curve_dir
        self.known_img_ids = set(self.coco_gt.getImgIds())
        self.last_report = ""
        self.reset()

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, dataset=None) -> "COCOEvaluator":
        kwargs = dict(cfg)
        if "ann_file" not in kwargs:
            if dataset is None or not hasattr(dataset, "coco_gt"):
                raise ConfigError(f"{path}: COCOEvaluator needs 'ann_file' or a val dataset with "
                                  f"coco_gt() (got {type(dataset).__name__})")
            kwargs["ann_file"] = dataset_coco_gt(dataset, path)
            kwargs.setdefault("label_to_cat_id", getattr(dataset, "label_to_cat_id", None))
            kwargs.setdefault("class_names", getattr(dataset, "class_names", None))
        return construct(cls, kwargs, path, errors=(TypeError, ValueError, FileNotFoundError))

    def reset(self) -> None:
        self._results: dict[int, DetectionTable] = {}

    def process(self, targets: list[dict], predictions: list[dict]) -> None:
        """Store the detections of one batch as arrays (targets give ``image_id``)."""
        for target, pred in zip(targets, predictions):
            image_id = int(target["image_id"])
            if image_id not in self.known_img_ids:
                raise ValueError(f"image_id {image_id} is not in the evaluator's ground truth")
            self._results[image_id] = self._to_table(image_id, pred)

    def _to_table(self, image_id: int, pred: dict) -> DetectionTable:
        """One image's ``boxes`` xyxy [K,4], ``scores`` [K], ``labels`` [K] (``masks``) -> rows."""
        # float64 before subtracting: widths equal those of the same boxes written to json
        xyxy = pred["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        boxes = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).numpy()
        labels = pred["labels"].detach().to("cpu", torch.int64).reshape(-1)
        num_labels = len(self.label_to_cat_id)
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if bad.numel():
            raise ValueError(f"image {image_id}: predicted label {int(bad[0])} outside 0..{num_labels - 1}")
        rles = None
        if "segm" in self.iou_types:
            if "masks" not in pred:
                raise ValueError("iou_types includes 'segm' but predictions have no 'masks'")
            rles = _encode_masks(pred["masks"].detach()) if len(labels) else []
        scores = pred["scores"].detach().to("cpu", torch.float64).reshape(-1).numpy()
        return DetectionTable(np.full(len(labels), image_id, np.int64), self._cat_of_label[labels.numpy()],
                              boxes, scores, rles)

    def evaluate(self) -> dict[str, float]:
        """Gather all ranks' results, score on rank 0, return the same dict on every rank."""
        merged = _dist.merge_per_image(_dist.all_gather_object(self._results))
        metrics, self.last_report = _dist.compute_on_rank0(lambda: self._score(merged))
        return metrics

    def _score(self, merged: dict[int, DetectionTable]) -> tuple[dict[str, float], str]:
        # Only the processed images count (a shortened val run must not be scored as misses).
        img_ids = sorted(merged) or None
        metrics: dict[str, float] = {}
        reports = []
        table = DetectionTable.concat([merged[i] for i in sorted(merged)])
        for iou_type in self.iou_types:
            m, rep = coco_evaluate(self.coco_gt, table, iou_type, img_ids, self.cat_names, self.pr_curve_dir,
                                   self.backend)
            metrics.update(m)
            reports.append(rep)
        return metrics, "\n\n".join(reports)

    def report(self) -> str:
        """The COCO summary block and per-class table of the last ``evaluate``."""
        return self.last_report
