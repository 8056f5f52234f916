"""INT8 / BF16 CPU deployment: accuracy of trained shapes models and latency of COCO-size models.

Accuracy (``QUANT_CHECKPOINTS=name=path,...``; rows without a checkpoint are skipped): each shapes
model is exported (FP32 ONNX at its val size), quantized with ``detkit.deploy.quantize`` on 300
train images through its test pipeline (ONNX Runtime QDQ and OpenVINO NNCF), and every artefact is
evaluated on the shapes val set with ``detkit.deploy.evaluate.evaluate_exported`` (the same loader
and evaluator as a checkpoint), and so is the FP32 graph on OpenVINO in BF16 (``precision="bf16"``).
Names: centernet, yolov3, yolov1, faster_rcnn, segmentor, dfine, rtdetr, rfdetr.

Latency: random-weight COCO-size configs (CenterNet-R18 512, YOLOv3-D53 416, Faster R-CNN R50-FPN
800 short side, the R18-FPN segmentor 512, D-FINE-N 640, RF-DETR-Nano 384), one 640x480 image
through the config's test pipeline, the padded batch and the runtime (decode + NMS or the DETRs'
top-k in the graph); variants alternate, ``--repeats`` rounds after ``--warmup``, at 1 and 2
threads; minimum and median reported, with the load average before and after (a busy second
core stalls 2-thread runs). Variants: PyTorch eager FP32 / BF16 autocast, ONNX Runtime FP32 /
INT8, OpenVINO FP32 / BF16 (``INFERENCE_PRECISION_HINT``) / INT8.

    python tools/benchmark.py quant --repeats 10
    QUANT_CHECKPOINTS=centernet=work_dirs/centernet_shapes/best.pth python tools/benchmark.py quant

``QUANT_MODELS=CenterNet,Faster`` runs only the latency rows whose name contains one of the words
(``QUANT_MODELS=NONE``: none of them, the accuracy rows alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import markdown_table
from benchmarks.deploy import MODELS as DEPLOY_MODELS

ROOT = Path(__file__).resolve().parents[2]
# the deploy table's configs and overrides; Faster R-CNN without its num_classes=90 (that row
# holds torchvision's COCO weights there), so it keeps the config's 80 classes here
LATENCY_MODELS = {
    "CenterNet-R18 512": DEPLOY_MODELS["CenterNet-R18 512"],
    "YOLOv3-D53 416": DEPLOY_MODELS["YOLOv3-D53 416"],
    "Faster R-CNN R50-FPN 800": ("configs/faster_rcnn/faster_rcnn_r50_fpn_coco.yaml",
                                 ["model.backbone.weights=null"]),
    "FPN segmentor R18 512": DEPLOY_MODELS["FPN segmentor R18 512"],
    "D-FINE-N 640": DEPLOY_MODELS["D-FINE-N 640"],
    "RF-DETR-Nano 384": DEPLOY_MODELS["RF-DETR-Nano 384"],
}
ACCURACY_MODELS = {
    "centernet": "configs/centernet/centernet_r18_shapes.yaml",
    "yolov3": "configs/yolo/yolov3_tiny_shapes.yaml",
    "yolov1": "configs/yolov1/yolov1_d53tiny_shapes.yaml",
    "faster_rcnn": "configs/faster_rcnn/faster_rcnn_r18_fpn_shapes.yaml",
    "segmentor": "configs/segmentation/seg_r18_shapes.yaml",
    "dfine": "configs/dfine/dfine_n_shapes.yaml",
    "rtdetr": "configs/rtdetr/rtdetr_v2_r18vd_shapes.yaml",
    "rfdetr": "configs/rfdetr/rfdetr_nano_shapes.yaml",
}


def isa_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
    return " ".join(f for f in wanted if f in flags)


def _export(cfg: dict, model, out: Path, hw: tuple[int, int]) -> None:
    from detkit.deploy.export import export_onnx

    export_onnx(model, out, hw[0], hw[1], config_text=None)


def _calibration(cfg: dict, model, onnx_path: Path, count: int, images=None):
    import onnxruntime as ort

    from detkit.deploy.quantize import CalibrationSet, calibration_images

    sess = ort.InferenceSession(str(onnx_path))
    source = images if images is not None else calibration_images(cfg, split="train", count=count)
    return CalibrationSet(cfg, source, input_shape=sess.get_inputs()[0].shape,
                          input_names=[i.name for i in sess.get_inputs()],
                          pixel_mean=model.pixel_mean.flatten().tolist(),
                          size_divisibility=model.size_divisibility)


def _quantize_all(cfg, model, fp32: Path, calib) -> dict[str, Path]:
    import json

    from detkit.deploy.quantize import quantize_onnx, quantize_openvino

    out = {"fp32": fp32, "int8-ort": fp32.with_suffix(".int8.onnx"), "int8-ov": fp32.with_suffix(".int8.xml")}
    quantize_onnx(fp32, out["int8-ort"], calib)
    quantize_openvino(fp32, out["int8-ov"], calib)
    info = json.loads(Path(f"{fp32}.json").read_text())
    for key in ("int8-ort", "int8-ov"):
        Path(f"{out[key]}.json").write_text(json.dumps(info))
    return out


def accuracy_rows(work: Path) -> list[list[str]]:
    from detkit.config import load_config
    from detkit.deploy.evaluate import evaluate_exported
    from detkit.inference import load_predictor_weights
    from detkit.models import build_model

    spec = dict(p.split("=", 1) for p in os.environ.get("QUANT_CHECKPOINTS", "").split(",") if "=" in p)
    rows = []
    for name, config in ACCURACY_MODELS.items():
        if name not in spec:
            continue
        cfg = load_config(ROOT / config, ["data.root=" + str(ROOT / "data/shapes")])
        model = build_model(cfg["model"]).eval()
        load_predictor_weights(model, spec[name])
        fp32 = work / f"{name}.onnx"
        _export(cfg, model, fp32, (128, 128))
        files = _quantize_all(cfg, model, fp32, _calibration(cfg, model, fp32, 300))
        metric = ("sem_seg/mIoU",) if name == "segmentor" else ("bbox/AP", "bbox/AP50")
        results = {k: evaluate_exported(cfg, f) for k, f in files.items()}
        results["bf16-ov"] = evaluate_exported(cfg, fp32, precision="bf16")
        for key in metric:
            base = results["fp32"][key]
            rows.append([name, key, f"{base:.3f}"]
                        + [f"{results[k][key]:.3f} ({results[k][key] - base:+.3f})"
                           for k in ("int8-ort", "int8-ov", "bf16-ov")])
    return rows


def _ov_runner(path: Path, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": precision,
                                   "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda batch: request.infer({0: batch})


def _ort_runner(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda batch: sess.run(None, {name: batch})


def _latency_variants(config: str, overrides: list[str], work: Path, threads: int):
    import cv2

    from detkit.config import load_config
    from detkit.data.shapes import render_image
    from detkit.inference import InferencePipeline
    from detkit.models import build_model

    cfg = load_config(ROOT / config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    pipeline = InferencePipeline(cfg)
    image = cv2.resize(render_image(0, "val", 0, 640)[0], (640, 480), interpolation=cv2.INTER_AREA)
    tensor, _ = pipeline(image)
    div = model.size_divisibility
    hw = tuple(-(-int(n) // div) * div for n in tensor.shape[-2:])
    fp32 = work / f"{abs(hash(config))}.onnx"
    _export(cfg, model, fp32, hw)
    calib_images = [cv2.resize(render_image(1, "train", i, 640)[0], (640, 480)) for i in range(32)]
    files = _quantize_all(cfg, model, fp32, _calibration(cfg, model, fp32, 32, calib_images))
    mean = model.pixel_mean.reshape(3, 1, 1).numpy()

    def padded(img):
        t, _ = pipeline(img)
        out = np.broadcast_to(mean, (3, *hw)).copy()
        out[:, : t.shape[-2], : t.shape[-1]] = t.numpy()
        return out[None].astype(np.float32)

    def eager(dtype):
        def fn(img):
            t, _ = pipeline(img)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                return model([t])
        return fn

    runners = {"eager fp32": eager("fp32"), "eager bf16": eager("bf16"),
               "ORT fp32": _ort_runner(files["fp32"], threads),
               "ORT int8": _ort_runner(files["int8-ort"], threads),
               "OV fp32": _ov_runner(files["fp32"], threads, "f32"),
               "OV bf16": _ov_runner(files["fp32"], threads, "bf16"),
               "OV int8": _ov_runner(files["int8-ov"], threads, "f32")}
    timed = {k: (fn if k.startswith("eager") else (lambda img, fn=fn: fn(padded(img))))
             for k, fn in runners.items()}
    return timed, image


def latency_rows(work: Path, args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    columns = ["eager fp32", "eager bf16", "ORT fp32", "ORT int8", "OV fp32", "OV bf16", "OV int8"]
    rows = []
    wanted = [w for w in os.environ.get("QUANT_MODELS", "").split(",") if w]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (config, overrides) in LATENCY_MODELS.items():
            if wanted and not any(w in name for w in wanted):
                continue
            variants, image = _latency_variants(config, overrides, work, threads)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for round_ in range(args.warmup + args.repeats):
                for key, fn in variants.items():
                    start = time.perf_counter()
                    fn(image)
                    if round_ >= args.warmup:
                        times[key].append((time.perf_counter() - start) * 1000)
            best = {k: (min(v), statistics.median(v)) for k, v in times.items()}
            int8 = min(best["ORT int8"][1] / best["ORT fp32"][1], best["OV int8"][1] / best["OV fp32"][1])
            rows.append([name, str(threads)] + [f"{best[c][0]:.0f} / {best[c][1]:.0f}" for c in columns]
                        + [f"{int8:.2f}"])
    return columns, rows


def run(args: argparse.Namespace) -> None:
    print(f"CPU ISA: {isa_flags()}; load average before: {os.getloadavg()[0]:.2f}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        acc = accuracy_rows(work)
        if acc:
            print(markdown_table(["model", "metric", "FP32 (ORT)", "INT8 ORT (drop)",
                                  "INT8 OpenVINO (drop)", "BF16 OpenVINO (drop)"], acc))
            print("\nshapes val set; INT8 calibrated on 300 train images through the test pipeline\n")
        columns, rows = latency_rows(work, args)
    print(markdown_table(["model", "threads"] + [f"{c} min/median (ms)" for c in columns]
                         + ["best INT8 / FP32 (same runtime, median)"], rows))
    print(f"\n{args.repeats} rounds after {args.warmup} warm-up, variants alternating, one 640x480 "
          f"image end to end (test pipeline + padded batch + graph); load average after: "
          f"{os.getloadavg()[0]:.2f}")
