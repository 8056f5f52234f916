#!/usr/bin/env python
"""Convert a torchvision detection checkpoint or a transformers model folder into a detkit checkpoint.

    python tools/convert_weights.py --from-transformers MODEL_DIR OUT.pth
    python tools/infer.py OUT.pth images/        # the config and class names are inside

``--from-transformers``: a Hugging Face model folder (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, ``preprocessor_config.json``) of ``RTDetrForObjectDetection``,
``RTDetrV2ForObjectDetection``, ``DFineForObjectDetection``, ``LwDetrForObjectDetection`` or
``RfDetrForObjectDetection``; the detkit config is built from
``config.json`` and stored in the checkpoint (``detkit.models.convert.from_transformers``).

torchvision (``{"model": state_dict}``):

    python tools/convert_weights.py fasterrcnn_resnet50_fpn_coco-258fb6c6.pth frcnn_r50_fpn_coco.pth \\
        --classes coco80
    python tools/eval.py configs/faster_rcnn/faster_rcnn_r50_fpn_coco.yaml frcnn_r50_fpn_coco.pth

``--classes``: ``all`` keeps every torchvision class (labels 0..K-1 = torchvision 1..K);
``coco80`` keeps the 80 real COCO categories of a 91-way torchvision COCO model, in the order of
detkit's COCO labels; or a comma-separated list of torchvision class indices.
Exit code 2 for a bad input file or argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    from detkit.models.convert import SUPPORTED_ARCHS

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="torchvision state dict (.pth), or with --from-transformers a "
                                    "transformers model folder")
    parser.add_argument("--from-transformers", action="store_true",
                        help="SRC is a Hugging Face model folder (RT-DETR, RT-DETRv2, D-FINE)")
    parser.add_argument("dst", help="output detkit checkpoint (.pth)")
    parser.add_argument("--arch", default="fasterrcnn_resnet50_fpn", choices=SUPPORTED_ARCHS)
    parser.add_argument("--classes", default="all", help="all | coco80 | comma-separated class indices")
    return parser.parse_args(argv)


def class_ids(spec: str):
    from detkit.models.convert import COCO_CATEGORY_IDS

    if spec == "all":
        return None
    if spec == "coco80":
        return COCO_CATEGORY_IDS
    try:
        return [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes: expected all, coco80 or integers like 1,2,3, got {spec!r}") from None


def convert_transformers(args: argparse.Namespace) -> int:
    import torch

    from detkit.models.convert.transformers import ConversionError, from_transformers

    try:
        ckpt = from_transformers(args.src)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.dst)
    print(f"wrote {args.dst}: {len(ckpt['model'])} tensors, {len(ckpt['meta']['class_names'])} "
          f"classes, {ckpt['meta']['arch']} (config inside: tools/infer.py {args.dst} IMAGES)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_transformers:
        return convert_transformers(args)
    import torch

    from detkit.models.convert import torchvision_to_detkit

    try:
        state = torch.load(args.src, map_location="cpu", weights_only=True)
        converted = torchvision_to_detkit(state, args.arch, class_ids(args.classes))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 2
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    # tools/eval.py and Predictor read anchor_stride_mode and switch to torchvision's anchors
    meta = {"converted_from": str(args.src), "arch": args.arch, "anchor_stride_mode": "torchvision"}
    torch.save({"model": converted, "meta": meta}, args.dst)
    num_classes = converted["roi_head.cls_score.weight"].shape[0] - 1
    print(f"wrote {args.dst}: {len(converted)} tensors, {num_classes} classes (set model.num_classes: "
          f"{num_classes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
