"""Small objects: one model, five ways to run it on large images.

The model is ``configs/small_objects/centernet_r18_small_crops.yaml`` (CenterNet-R18 trained on
128 px crops of the ``--preset small`` canvases, so objects are 8-32 px at training scale). The
val canvases are 1024 x 1024. Methods (rows):

* (a) whole canvas resized to the training crop size (128) or to 512: what a fixed-input-size
  detector does with a large image; objects shrink 8x / 2x;
* (b) whole canvas at full resolution (objects at training scale; activations of a 1024 px image);
* (c) sliced: 256 px tiles, overlap 0.2, NMS (``Predictor(slice_size=256, full_image=False)``);
* (d) sliced + a full-image pass (here at full resolution, the config's test pipeline);
* (e) test-time augmentation on the 512 px canvas: scales 1 and 2, horizontal flip, NMS.

Reports COCO AP, AP50, APs, AR100 (``detkit.evaluation.coco``) and images/s (wall time of
``Predictor.predict_arrays`` over the decoded canvases, one at a time, after one warm-up image).

    python tools/benchmark.py small_objects --threads 1
    python tools/benchmarks/small_objects.py [--checkpoint PATH] [--data-root DIR]
        [--num-images N] [--slice S] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

if __name__ == "__main__":   # as a script: this folder (it has an ssl.py) must not shadow the stdlib
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "small_objects" / "centernet_r18_small_crops.yaml"
CHECKPOINT = ROOT / "work_dirs" / "centernet_r18_small_crops" / "last.pth"
DATA = ROOT / "data" / "shapes_small"


def _resize(size: int) -> list[dict]:
    return [{"type": "ResizeShortestEdge", "short_edge": size, "max_size": size}]


def methods(slice_size: int) -> list[tuple[str, dict, dict]]:
    """(row name, config overrides, Predictor keyword arguments) per method."""
    tta = {"scales": [1.0, 2.0], "flip": True, "merge": "nms"}
    return [
        ("(a) whole canvas resized to 128", {"data.val.pipeline": _resize(128)}, {}),
        ("(a) whole canvas resized to 512", {"data.val.pipeline": _resize(512)}, {}),
        ("(b) whole canvas, full resolution", {}, {}),
        # CenterNet keeps its top-100 peaks per image: a whole canvas of ~67 objects competes for
        # them with background peaks, each tile of a sliced run gets its own 100
        ("(b) full resolution, model.head.topk 500", {"model.head.topk": 500}, {}),
        (f"(c) sliced {slice_size}, overlap 0.2", {}, {"slice_size": slice_size, "full_image": False}),
        (f"(c) sliced {slice_size}, WBF", {}, {"slice_size": slice_size, "full_image": False,
                                              "slice_merge": "wbf"}),
        (f"(d) sliced {slice_size} + full image", {}, {"slice_size": slice_size, "full_image": True}),
        ("(e) TTA on 512: scales 1, 2 + flip", {"data.val.pipeline": _resize(512),
                                                "model.test_time_aug": tta}, {}),
    ]


def _override(cfg: dict, key: str, value) -> None:
    node = cfg
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _to_coco(result: dict, image_id: int, cat_ids: list[int]) -> list[dict]:
    xyxy = result["boxes"].float()
    xywh = xyxy.clone()
    xywh[:, 2:] -= xyxy[:, :2]
    return [{"image_id": image_id, "category_id": cat_ids[label], "bbox": box, "score": score}
            for box, score, label in zip(xywh.tolist(), result["scores"].tolist(), result["labels"].tolist())]


def evaluate(predictor, images: list[tuple[int, object]], coco_gt) -> dict:
    """COCO metrics and images/s of ``predictor`` on ``images`` [(image_id, HxWx3 RGB)]."""
    from detkit.evaluation.coco import coco_evaluate

    cat_ids = sorted(coco_gt.getCatIds())
    predictor.predict_arrays([images[0][1]])        # warm-up
    results, start = [], time.perf_counter()
    for image_id, image in images:
        results.extend(_to_coco(predictor.predict_arrays([image])[0], image_id, cat_ids))
    seconds = time.perf_counter() - start
    metrics, _ = coco_evaluate(coco_gt, results, img_ids=[i for i, _ in images])
    return {**{k.split("/")[1]: v for k, v in metrics.items() if k.count("/") == 1},
            "images/s": len(images) / seconds}


def run(args: argparse.Namespace) -> None:
    import cv2
    import torch

    from detkit.config import load_config
    from detkit.evaluation.coco import load_coco
    from detkit.inference import Predictor

    checkpoint = Path(getattr(args, "checkpoint", None) or CHECKPOINT)
    data = Path(getattr(args, "data_root", None) or DATA)
    ann = data / "annotations" / "instances_val.json"
    if not checkpoint.is_file() or not ann.is_file():
        print(f"skipped: needs {checkpoint} (python tools/train.py {CONFIG.relative_to(ROOT)}) and "
              f"{ann} (python -m detkit.data.shapes --out {data} --preset small)\n")
        return
    coco_gt = load_coco(ann)
    infos = coco_gt.loadImgs(sorted(coco_gt.getImgIds()))[: getattr(args, "num_images", None) or None]
    images = [(info["id"], cv2.cvtColor(cv2.imread(str(data / "val" / info["file_name"])), cv2.COLOR_BGR2RGB))
              for info in infos]
    base = load_config(CONFIG, [f"data.root={data}"])
    slice_size = getattr(args, "slice", None) or 256
    measured = []
    only = getattr(args, "only", None)
    for name, overrides, kwargs in methods(slice_size):
        if only and not any(text in name for text in only):
            continue
        cfg = copy.deepcopy(base)
        for key, value in overrides.items():
            _override(cfg, key, value)
        predictor = Predictor(cfg, checkpoint, device=args.device, score_thr=0.0, batch_size=4, **kwargs)
        measured.append((name, evaluate(predictor, images, coco_gt)))
        print(f"  {name}: {measured[-1][1]}", file=sys.stderr, flush=True)   # kept if a later row fails
    # ratios to (a) at 512: at 128 the objects are 1-4 px and nearly nothing is found
    reference = dict(measured).get("(a) whole canvas resized to 512", {"APs": 0.0, "AR100": 0.0})
    rows = [[name, *(f"{m[k]:.3f}" for k in ("AP", "AP50", "APs", "AR100")), f"{m['images/s']:.2f}",
             _ratio(m["APs"], reference["APs"]), _ratio(m["AR100"], reference["AR100"])]
            for name, m in measured]
    from benchmarks.common import markdown_table

    num_objects = len(coco_gt.getAnnIds(imgIds=[i for i, _ in images]))
    print(f"{len(images)} val canvases of {data} ({images[0][1].shape[0]} x {images[0][1].shape[1]}, "
          f"{num_objects} objects), checkpoint {checkpoint}, score_thr 0, torch threads "
          f"{torch.get_num_threads()}, device {args.device}\n")
    print(markdown_table(["method", "AP", "AP50", "APs", "AR100", "images/s", "APs / (a) 512",
                          "AR100 / (a) 512"], rows))
    print()


def _ratio(value: float, ref: float) -> str:
    return f"{value / ref:.1f}x" if ref > 0 else ("inf" if value > 0 else "-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help=f"default {CHECKPOINT.relative_to(ROOT)}")
    parser.add_argument("--data-root", help=f"default {DATA.relative_to(ROOT)}")
    parser.add_argument("--num-images", type=int, help="evaluate the first N val canvases (default all)")
    parser.add_argument("--slice", type=int, default=256, help="tile size of rows (c), (d)")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="only the rows whose name contains a TEXT")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
