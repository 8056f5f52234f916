"""COCO bbox evaluation at COCO scale: pycocotools vs faster-coco-eval vs detkit, one generated case.

``detkit.evaluation.synthetic_coco`` writes a val-like split (2,000 images, 80 sparse category
ids, small/medium/large objects, crowd regions, ~105,000 detections: jittered copies of objects,
duplicates, label confusions, false positives) to ``gt.json`` / ``dt.json`` in a temporary folder.
Every row starts from those files and ends with the 12 COCOeval stats:

* pycocotools / faster-coco-eval: ``COCO(gt)``, ``loadRes(dt)``, evaluate, accumulate, summarize;
* detkit file mode: ``evaluate_coco_files`` (default backend: faster-coco-eval; with
  ``backend="pycocotools"`` it takes pycocotools' time, omitted here to keep the run short);
* detkit from a model: ``COCOEvaluator(ann_file=gt.json)``, then ``process`` of the detections as
  a detector returns them (float32 xyxy tensors, batches of 8 images) and ``evaluate``.

Times are medians of ``--repeats`` runs (no warm-up: each run parses its files anew); the ratio is
to pycocotools in the same run; ``max |d|`` is the largest difference of the 12 stats to pycocotools'.

A second table times the other evaluators at their usual scale: ``VOCEvaluator`` on VOC07-test
size (4,952 images, 50 detections each, 20 classes; process + evaluate) and ``SegEvaluator`` on
512 x 512 masks with 21 classes (per image).
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.common import markdown_table

NUM_IMAGES = 2000
DETS_PER_IMAGE = 56


def _library_eval(coco_cls, eval_cls, gt_file: Path, dt_file: Path, **kwargs) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_cls(str(gt_file))
        ev = eval_cls(gt, gt.loadRes(str(dt_file)), "bbox", **kwargs)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], np.float64)


def _stats(metrics: dict) -> np.ndarray:
    from detkit.evaluation import STAT_NAMES

    return np.array([metrics[f"bbox/{n}"] for n in STAT_NAMES])


def _model_mode(gt_file: Path, predictions: dict[int, dict], batch: int = 8) -> np.ndarray:
    from detkit.evaluation import COCOEvaluator

    evaluator = COCOEvaluator(ann_file=str(gt_file))
    items = sorted(predictions.items())
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        evaluator.process([{"image_id": k} for k, _ in chunk], [p for _, p in chunk])
    return _stats(evaluator.evaluate())


def _voc_items(num_images: int = 4952, dets: int = 50, classes: int = 20) -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(num_images):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 300, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 200, (n, 2))], 1)
        labels = rng.integers(0, classes, n)
        src = rng.integers(0, n, dets)
        det_labels = np.where(rng.random(dets) < 0.8, labels[src], rng.integers(0, classes, dets))
        difficult = torch.from_numpy(rng.random(n) < 0.1)
        items.append(({"image_id": i, "boxes": torch.tensor(gt, dtype=torch.float32),
                       "labels": torch.from_numpy(labels), "difficult": difficult},
                      {"boxes": torch.tensor(gt[src] + rng.normal(0, 8, (dets, 4)), dtype=torch.float32),
                       "scores": torch.from_numpy(rng.random(dets)).float(),
                       "labels": torch.from_numpy(det_labels)}))
    return items


def _other_evaluators(repeats: int) -> list[list[str]]:
    from detkit.evaluation import SegEvaluator, VOCEvaluator

    items = _voc_items()

    def voc() -> np.ndarray:
        ev = VOCEvaluator(class_names=[f"c{i}" for i in range(20)])
        for target, pred in items:
            ev.process([target], [pred])
        return np.array([ev.evaluate()["voc/mAP"]])

    gen = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 21, (512, 512), generator=gen)
    gt[torch.rand(512, 512, generator=gen) < 0.05] = 255
    pred = torch.where(torch.rand(512, 512, generator=gen) < 0.7, gt.clamp(max=20),
                       torch.randint(0, 21, (512, 512), generator=gen))

    def seg(n: int = 100) -> np.ndarray:
        ev = SegEvaluator(num_classes=21)
        for i in range(n):
            ev.process([{"image_id": i, "sem_seg": gt}], [{"sem_seg": pred}])
        return np.array([ev.evaluate()["sem_seg/mIoU"]])

    t_voc, _ = _timed(voc, repeats)
    t_seg, _ = _timed(seg, repeats)
    return [["VOCEvaluator, 4,952 images x 50 detections, 20 classes", f"{t_voc:.2f} s"],
            ["SegEvaluator, 512 x 512, 21 classes", f"{t_seg / 100 * 1000:.1f} ms / image"]]


def _timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    assert out is not None
    return statistics.median(times), out


def run(args) -> None:
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detkit.evaluation import STAT_NAMES, evaluate_coco_files
    from detkit.evaluation.synthetic import results_to_predictions, synthetic_coco

    gt, results = synthetic_coco(NUM_IMAGES, dets_per_image=DETS_PER_IMAGE, seed=0)
    predictions = results_to_predictions(gt, results)
    silent = lambda *a, **k: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        gt_file, dt_file = Path(tmp) / "gt.json", Path(tmp) / "dt.json"
        gt_file.write_text(json.dumps(gt))
        dt_file.write_text(json.dumps(results))
        cases = [
            ("pycocotools 2.0 (file)", lambda: _library_eval(COCO, COCOeval, gt_file, dt_file)),
            ("faster-coco-eval (file)", lambda: _library_eval(FasterCOCO, COCOeval_faster, gt_file, dt_file,
                                                              print_function=silent)),
            ("detkit file, backend faster", lambda: _stats(evaluate_coco_files(gt_file, dt_file)[0])),
            ("detkit COCOEvaluator process+evaluate", lambda: _model_mode(gt_file, predictions)),
        ]
        measured = [(name, *_timed(fn, args.repeats)) for name, fn in cases]
    ref_time, ref_stats = measured[0][1], measured[0][2]
    rows = [[name, f"{t:.2f}", f"{t / ref_time:.3f}x", f"{np.abs(stats - ref_stats).max():.1e}",
             *(f"{v:.4f}" for v in stats)] for name, t, stats in measured]
    print(f"{NUM_IMAGES} images, {len(gt['annotations'])} objects "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(results)} detections, "
          f"{len(gt['categories'])} categories; median of {max(1, args.repeats)} run(s)\n")
    print(markdown_table(["evaluation", "time s", "vs pycocotools", "max |d|", *STAT_NAMES], rows))
    print()
    print(markdown_table(["other evaluators (process + evaluate)", "time"], _other_evaluators(args.repeats)))
