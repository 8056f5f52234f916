"""Deployment: end-to-end latency of PyTorch vs ONNX Runtime vs OpenVINO, per model family.

Every column times the same ``Predictor.predict_arrays([image])`` call on the same 640x480 RGB
uint8 image (a synthetic shapes scene): the config's test pipeline (resize / letterbox),
the model, decoding + NMS and mapping boxes back to the image. Columns:

* eager: the PyTorch model as built;
* options: PyTorch with BatchNorm folded into the convolutions (``Predictor(fold_bn=True)``);
* +NHWC: additionally channels_last weights (``channels_last=True``);
* ``compile=True`` is not timed here: compiling even the R18 backbone took over 110 s on the
  shared 2-core machine (the first call), which a few repeats cannot amortise;
* ORT / OpenVINO: the model exported by ``detkit.deploy.export`` (decode + NMS in the graph),
  run by ``Predictor(config, "model.onnx", backend=...)`` with the same pre/post-processing;
* torchvision (Faster R-CNN row): ``fasterrcnn_resnet50_fpn(weights=None,
  weights_backbone=None)`` with detkit's model holding the same weights (converted), on the same
  image resized to 800x1067 by both, so detections are identical.

Models are random-weight (no downloads); CenterNet-R18 at 512 (letterbox), YOLOv3-D53 at 416,
Faster R-CNN R50-FPN at short side 800, the shapes FPN segmentor (R18) at 512, D-FINE-N
(HGNetv2-B0) and RT-DETRv2-R18vd at 640x640 and RF-DETR-Nano (windowed ViT-S/16) at 384x384
(their COCO test pipelines resize to that square; the graph keeps the top 300 queries, no NMS).
Graphs are exported with dynamic batch / height / width, except through a ViT (fixed to the
padded input size: ``fixed_export_size``). Variants run alternately (one call each in turn,
``--repeats`` rounds after ``--warmup``); the minimum and the median of the repeats are
reported, with the load average before and after (a busy second core stalls 2-thread runs).
``--threads`` sets torch's and the runtimes' intra-op threads; ``--size`` and
``--device`` are ignored (CPU). ``DEPLOY_MODELS=CenterNet,YOLO`` (environment) runs only the rows
whose name contains one of the comma-separated words (case-sensitive substrings of the row names
above, e.g. ``DEPLOY_MODELS=D-FINE,RT-DETR``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.common import markdown_table

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "CenterNet-R18 512": ("configs/centernet/centernet_r18_coco.yaml", ["model.backbone.weights=null"]),
    "YOLOv3-D53 416": ("configs/yolo/yolov3_d53_416_coco.yaml", []),
    "Faster R-CNN R50-FPN 800": ("configs/faster_rcnn/faster_rcnn_r50_fpn_coco.yaml",
                                 ["model.backbone.weights=null", "model.num_classes=90"]),
    "FPN segmentor R18 512": ("configs/segmentation/seg_r18_shapes.yaml",
                              ["data.val.pipeline=[{type: Resize, height: 512, width: 512}]"]),
    # NMS-free DETRs: top-300 queries in the graph; the configs' backbones already have weights: null
    "D-FINE-N 640": ("configs/dfine/dfine_n_coco.yaml", ["model.backbone.weights=null"]),
    "RT-DETRv2-R18vd 640": ("configs/rtdetr/rtdetr_v2_r18vd_coco.yaml", ["model.backbone.weights=null"]),
    "RF-DETR-Nano 384": ("configs/rfdetr/rfdetr_nano_coco.yaml", []),
}


def _image() -> np.ndarray:
    from detkit.data.shapes import render_image

    return cv2.resize(render_image(0, "val", 0, 640)[0], (640, 480), interpolation=cv2.INTER_AREA)


def _variants(name: str, config: str, overrides: list[str], work: Path, threads: int) -> dict:
    """{column: callable(image)} for one model family."""
    from detkit import Predictor
    from detkit.config import load_config
    from detkit.deploy.export import export_onnx, fixed_size_layer

    cfg = load_config(ROOT / config, overrides)
    eager = Predictor(cfg, None, score_thr=0.05)
    tv = None
    if "Faster" in name:
        tv = _torchvision_twin(eager.model)
    ckpt = work / f"{len(list(work.iterdir()))}.pth"
    torch.save({"model": eager.model.state_dict()}, ckpt)
    variants = {"eager": eager.predict_arrays,
                "options": Predictor(cfg, ckpt, score_thr=0.05, fold_bn=True).predict_arrays,
                "+NHWC": Predictor(cfg, ckpt, score_thr=0.05, fold_bn=True,
                                   channels_last=True).predict_arrays}
    tensor, _ = eager.pipeline(_image())
    onnx = ckpt.with_suffix(".onnx")
    div = eager.model.size_divisibility
    height, width = (-(-int(n) // div) * div for n in tensor.shape[-2:])   # the padded size
    dynamic = fixed_size_layer(eager.model) is None
    export_onnx(copy.deepcopy(eager.model), onnx, height, width, dynamic=dynamic)
    for backend in ("onnxruntime", "openvino"):
        variants[backend] = Predictor(cfg, onnx, score_thr=0.05, backend=backend,
                                      threads=threads).predict_arrays
    if tv is not None:
        def run_tv(images, model=tv):
            with torch.inference_mode():
                return model([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
        variants["torchvision"] = run_tv
    return variants


def _torchvision_twin(model: torch.nn.Module):
    """torchvision's fasterrcnn_resnet50_fpn with random weights, copied into ``model``."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from detkit.models.convert import load_torchvision_weights

    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    load_torchvision_weights(model, tv.state_dict())
    return tv


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    image = _image()
    columns = ["eager", "options", "+NHWC", "onnxruntime", "openvino", "torchvision"]
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        wanted = [w for w in os.environ.get("DEPLOY_MODELS", "").split(",") if w]
        for name, (config, overrides) in MODELS.items():
            if wanted and not any(w in name for w in wanted):
                continue
            variants = _variants(name, config, overrides, Path(tmp), args.threads)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for round_ in range(args.warmup + args.repeats):
                for key, fn in variants.items():
                    start = time.perf_counter()
                    fn([image])
                    if round_ >= args.warmup:
                        times[key].append(time.perf_counter() - start)
            med = {k: statistics.median(v) * 1000 for k, v in times.items()}
            low = {k: min(v) * 1000 for k, v in times.items()}
            reference = med["torchvision"] if "torchvision" in med else med["eager"]
            rows.append([name] + [f"{low[c]:.0f} / {med[c]:.0f}" if c in med else "-" for c in columns]
                        + [f"{med['onnxruntime'] / reference:.2f}"])
    print(markdown_table(["model"] + [f"{c} min / median (ms)" for c in columns]
                         + ["ORT / eager (torchvision for R-CNN), medians"], rows))
    print(f"\nmin / median of {args.repeats} end-to-end Predictor calls after {args.warmup} warm-up, "
          f"{args.threads} thread(s), one 640x480 image, variants alternating; load average "
          f"before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
