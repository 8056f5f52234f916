"""YOLOv3-D53 at 416 and 608, batch 1, 80 classes: network forward and post-processing per image.

"forward" = Darknet-53 + YOLOv3Neck + YOLOHead convs on the normalised, padded tensor (eval
mode); "post-process" = ``YOLOHead.predict``: decode all levels, objectness x class scores,
threshold (0.005), top-1000 candidates, class-wise ``batched_nms`` (IoU 0.45), 100 detections.
Two output sets are post-processed:

* "untrained": the raw outputs of the freshly initialised model (objectness ~0.01, classes ~0.5,
  so about half of the P x 80 scores sit at the threshold: hundreds of thousands of candidates);
* "dense": every objectness / class logit set to 0 (score 0.25 everywhere): all P x 80
  candidates pass the threshold, the worst case for the top-k cap and NMS.

The input sizes are fixed (``--size`` is ignored); ``--device``, ``--threads``, ``--repeats``,
``--warmup`` apply.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import count_flops, count_params, markdown_table, time_call

SIZES = (416, 608)
NUM_CLASSES = 80


def build():
    from detkit.models import build_model

    return build_model({
        "type": "OneStageDetector", "num_classes": NUM_CLASSES,
        "backbone": {"type": "Darknet53"},
        "neck": {"type": "YOLOv3Neck"},
        "head": {"type": "YOLOHead", "feat_channels": [256, 512, 1024]},
    })


def _candidates(head, outputs) -> int:
    raw = head.flatten(outputs)[0]
    scores = raw[:, 4:5].sigmoid() * raw[:, 5:].sigmoid()
    return int((scores > head.score_thr).sum())


def _measure(model, size: int, args) -> list[list]:
    from detkit.structures import ImageList

    batch = model.preprocess([torch.rand(3, size, size, device=args.device)])
    network = lambda t: model.head(model.features(ImageList(t, batch.image_sizes)))  # noqa: E731
    outputs = network(batch.tensor)
    dense = [o.clone() for o in outputs]
    for o in dense:
        o[..., 4:] = 0.0
    t_forward = time_call(lambda: network(batch.tensor), args.repeats, args.warmup, args.device)
    gflops = count_flops(lambda: network(batch.tensor)) / 1e9
    rows = []
    for name, outs in (("untrained", outputs), ("dense", dense)):
        t_post = time_call(lambda outs=outs: model.head.predict(outs, batch.image_sizes), args.repeats,
                           args.warmup, args.device)
        num_preds = sum(o[0, ..., 0].numel() for o in outs)
        rows.append([f"YOLOv3-D53 {size}", name, f"{count_params(model) / 1e6:.1f}", f"{gflops:.0f}",
                     f"{num_preds}", f"{_candidates(model.head, outs)}", f"{t_forward * 1000:.0f}",
                     f"{t_post * 1000:.1f}", f"{100 * t_post / t_forward:.1f}%"])
    return rows


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build().eval().to(args.device)
    rows = []
    with torch.no_grad():
        for size in SIZES:
            rows += _measure(model, size, args)
    print(f"batch 1, {NUM_CLASSES} classes, 3 levels x 3 anchors, eval mode; times are medians per "
          f"image; GFLOPs = 2 x multiply-adds of the forward; candidates = scores above "
          f"score_thr before the top-{model.head.pre_nms_topk} cap\n")
    print(markdown_table(["model", "outputs", "params (M)", "GFLOPs", "predictions", "candidates",
                          "forward (ms)", "post-process (ms)", "post / forward"], rows))
