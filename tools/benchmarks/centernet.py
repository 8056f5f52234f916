"""CenterNet-R18 (plain and DCN neck) at 512x512, batch 1: network forward and decode time per image.

"forward" = backbone + CenterNetUpsample + CenterNetHead on the normalised, padded tensor;
"decode" = ``CenterNetHead.predict`` (sigmoid, 3x3 max-pool peaks, top-100, boxes, clip) on
those outputs; "+ NMS" adds the optional class-wise NMS (IoU 0.5); "flip forward" runs the image
and its mirror as a batch of 2 (flip test). The input size is fixed at the paper's 512 (``--size``
is ignored here); ``--device``, ``--threads``, ``--repeats``, ``--warmup`` apply.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import count_flops, count_params, markdown_table, time_call

SIZE = 512         # the paper's input resolution
NUM_CLASSES = 80   # COCO

MODELS = {
    "CenterNet-R18": {"deformable": False},
    "CenterNet-R18-DCN": {"deformable": True, "dcn_version": 2},
}


def build(neck_extra: dict):
    from detkit.models import build_model

    return build_model({
        "type": "OneStageDetector", "num_classes": NUM_CLASSES,
        "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c5"], "weights": None},
        "neck": {"type": "CenterNetUpsample", "channels": [256, 128, 64], **neck_extra},
        "head": {"type": "CenterNetHead"},
    })


def _measure(model, image: torch.Tensor, args) -> list:
    from detkit.structures import ImageList

    batch = model.preprocess([image])
    network = lambda t: model.head(model.features(ImageList(t, batch.image_sizes * len(t))))  # noqa: E731
    outputs = network(batch.tensor)
    # a trained heatmap is mostly low with a few peaks; random init is flat, which would make the
    # top-k trivially cheap or expensive. Use a fixed random map so decode does the same work.
    gen = torch.Generator().manual_seed(0)
    outputs["heatmap"] = (torch.randn(outputs["heatmap"].shape, generator=gen) * 2 - 4).to(args.device)
    no_nms = model.head.nms_iou_thresh
    t_forward = time_call(lambda: network(batch.tensor), args.repeats, args.warmup, args.device)
    t_decode = time_call(lambda: model.head.predict(outputs, batch.image_sizes), args.repeats,
                         args.warmup, args.device)
    model.head.nms_iou_thresh = 0.5
    t_nms = time_call(lambda: model.head.predict(outputs, batch.image_sizes), args.repeats,
                      args.warmup, args.device)
    model.head.nms_iou_thresh = no_nms
    both = torch.cat([batch.tensor, batch.tensor.flip(-1)])
    t_flip = time_call(lambda: network(both), args.repeats, args.warmup, args.device)
    gflops = count_flops(lambda: network(batch.tensor)) / 1e9
    return [f"{count_params(model) / 1e6:.2f}", f"{gflops:.1f}", f"{t_forward * 1000:.0f}",
            f"{t_decode * 1000:.1f}", f"{t_nms * 1000:.1f}", f"{t_flip * 1000:.0f}"]


def run(args: argparse.Namespace) -> None:
    rows = []
    for name, neck_extra in MODELS.items():
        torch.manual_seed(0)
        model = build(neck_extra).eval().to(args.device)
        image = torch.rand(3, SIZE, SIZE, device=args.device)
        with torch.no_grad():
            rows.append([name] + _measure(model, image, args))
    print(f"batch 1, {SIZE}x{SIZE}, {NUM_CLASSES} classes, output stride 4 ({SIZE // 4}x{SIZE // 4} "
          f"heatmap), eval mode; times are medians per image; GFLOPs = 2 x multiply-adds of the "
          f"forward (deformable convs counted as dense)\n")
    print(markdown_table(["model", "params (M)", "GFLOPs", "forward (ms)", "decode (ms)",
                          "decode + NMS (ms)", "flip forward, 2 images (ms)"], rows))
