#!/usr/bin/env python
"""Export a detkit model to ONNX end to end (decode + NMS in the graph), checked with onnxruntime.

    python tools/export.py CONFIG CHECKPOINT --out model.onnx [--size H W] [--batch B]
        [--dynamic] [--opset 17] [--no-check] [--set key=value ...]
    python tools/export.py CONFIG CHECKPOINT --out model.int8.onnx --int8 (--calib DIR | --calib-split
        train) [--calib-images 300] [--backend onnxruntime|openvino] [--int8-skip PATTERN ...]

The graph (see ``detkit/deploy/export.py``): input ``images`` Float[B,3,H,W] RGB in [0,1] (H, W
multiples of the model's ``size_divisibility``) -> normalisation -> backbone -> neck -> head ->
decoding, score threshold, top-k and class-wise NMS (ONNX ``NonMaxSuppression``; two-stage
models also the RPN and ``RoiAlign``); the optional input ``image_sizes`` Int64[B,2] (each
image's size before padding; default the input size) is where boxes are clipped and filtered.
Outputs ``boxes`` Float[B,K,4] xyxy input pixels, ``scores`` Float[B,K], ``labels`` Int64[B,K]
(-1 on padding rows) and ``num_detections`` Int64[B]; segmentors ``sem_seg`` Int64[B,H,W].
``--dynamic`` makes batch, height and width dynamic. ``<out>.json`` holds the output names, the
class names, the dataset's category ids and the resolved config, so
``tools/infer.py`` / ``Predictor`` can run the file with onnxruntime alone.

Resizing / letterboxing the image (the config's ``data.val.pipeline``) and mapping boxes back
to the original image stay outside the graph. The check (default on) runs onnxruntime and the
PyTorch model on synthetic "shapes" images with several objects, at the export size and (for
detectors) smaller by half the ``size_divisibility``, padded and fed with ``image_sizes``, and
compares the detections (same count and labels, box corners within ``--box-tol`` x image size,
scores within ``--score-tol``; a message counts the differences that are score ties); exit code
1 when they differ (reported only, for random weights). The caller's model is never modified.

``--int8``: the FP32 graph is written as ``<out stem>.fp32.onnx``, then quantized into ``--out``
(post-training static quantization, ``detkit/deploy/quantize.py``: per-channel symmetric int8
weights of every Conv / Gemm / MatMul, activations calibrated on ``--calib-images`` images through
the config's test pipeline; the first conv and the prediction layers stay float, decode / NMS /
RoI stages are no such ops). ``--backend openvino`` writes an OpenVINO IR (``.xml`` + ``.bin``)
with NNCF. ``Predictor`` / ``tools/infer.py`` / ``tools/eval.py`` run either file unchanged; the
check reports how many FP32 detections the INT8 model keeps (README "INT8").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.config import ConfigError, get_path, load_config  # noqa: E402
from detkit.deploy.check import check_export  # noqa: E402
from detkit.deploy.export import ExportError, export_onnx  # noqa: E402
from detkit.inference import CheckpointError, load_predictor_weights, resolve_class_names  # noqa: E402
from detkit.models import build_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint", help="checkpoint, or 'none' for random weights")
    parser.add_argument("--out", required=True,
                        help="output .onnx file (.xml with --int8 --backend openvino)")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch / height / width")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--box-tol", type=float, default=1e-4, help="box tolerance x image size")
    parser.add_argument("--score-tol", type=float, default=1e-4)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    int8 = parser.add_argument_group("INT8 post-training quantization (detkit/deploy/quantize.py)")
    int8.add_argument("--int8", action="store_true", help="write an INT8 model to --out")
    int8.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime",
                      help="onnxruntime: QDQ .onnx; openvino: NNCF-quantized IR .xml")
    int8.add_argument("--calib", metavar="DIR", help="folder of calibration images")
    int8.add_argument("--calib-split", metavar="SPLIT", help="calibrate on data.SPLIT (train, val)")
    int8.add_argument("--calib-images", type=int, default=300, metavar="N")
    int8.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                      help="onnxruntime's activation calibration")
    int8.add_argument("--int8-skip", nargs="+", default=[], metavar="PATTERN",
                      help="ONNX node names (fnmatch) kept in float besides the rule's")
    args = parser.parse_args(argv)
    if args.int8 and (args.calib is None) == (args.calib_split is None):
        parser.error("--int8 needs exactly one of --calib DIR or --calib-split SPLIT")
    if not args.int8 and (args.calib or args.calib_split or args.int8_skip):
        parser.error("--calib / --calib-split / --int8-skip go with --int8")
    if args.batch < 1 or min(args.size) < 1:
        parser.error("--batch and --size must be >= 1")
    return args


def quantize(args, cfg: dict, fp32: Path) -> int:
    """``--int8``: quantize the FP32 export into ``--out`` and compare their detections."""
    from detkit.deploy.check import compare_int8
    from detkit.deploy.quantize import QuantizationError, quantize_export

    out = Path(args.out)
    try:
        info = quantize_export(cfg, fp32, out, backend=args.backend, folder=args.calib,
                               split=args.calib_split, count=args.calib_images,
                               skip=args.int8_skip, method=args.calib_method)
    except (QuantizationError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q = info["quantization"]
    print(f"wrote {out} (INT8, {args.backend}; {q['calibration_images']} calibration images from "
          f"{q['source']}; float layers: {', '.join(q['float_layers']) or 'none'})")
    if not args.no_check:
        kept = compare_int8(fp32, out, args.size[0], args.size[1], args.batch)
        print(f"INT8 check: {kept:.0%} of the FP32 model's detections (score > 0.3) found by the INT8 "
              f"model with the same label and IoU >= 0.9 on shapes images; measure the accuracy "
              f"with tools/eval.py CONFIG {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.int8:     # the FP32 graph is written beside the INT8 one, then quantized
        out = out.with_name(out.name.rsplit(".", 1)[0] + ".fp32.onnx")
    height, width = args.size
    try:
        cfg = load_config(args.config, args.set)
        model = build_model(cfg["model"])
        meta = {}
        if args.checkpoint.lower() != "none":
            meta = load_predictor_weights(model, args.checkpoint)
        names, cat_ids, _ = resolve_class_names(cfg, meta, get_path(cfg, "model.num_classes", None))
        info = export_onnx(model, out, height, width, batch=args.batch, opset=args.opset,
                           dynamic=args.dynamic, class_names=names, label_to_cat_id=cat_ids,
                           config_text=yaml.safe_dump(cfg, sort_keys=False))
    except (ConfigError, CheckpointError, ExportError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out}.json; outputs: "
          f"{', '.join(info['outputs'])}")
    if args.int8:
        return quantize(args, cfg, out)
    if args.no_check:
        return 0
    problems = check_export(model, out, height, width, args.batch, args.box_tol, args.score_tol)
    for p in problems:
        print(f"  {p}")
    print(f"onnxruntime check {'FAILED' if problems else 'passed'}: detections of onnxruntime vs "
          f"PyTorch on {args.batch} shapes image(s) at {height}x{width}")
    if problems and args.checkpoint.lower() == "none":
        # An untrained model scores nearly every candidate alike (e.g. YOLO's 0.01 prior), so the
        # order among (almost) tied scores, and hence NMS's choice, is not defined.
        print("  (random weights: near-tied scores; not counted as a failure)")
        return 0
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
