"""Faster R-CNN R50-FPN inference: detkit vs torchvision on the same 800x1333 image, batch 1.

Both models have identical weights (torchvision's random-init model with FrozenBatchNorm2d, as
in its COCO-pretrained form, converted with ``detkit.models.convert``), so they produce the same
proposals and detections and the NMS / post-processing work is identical. Timed: the whole
``model([image])`` call in eval mode (normalise, pad to 32, backbone, FPN, RPN, RoI head,
post-processing), the two models alternating run by run. torchvision's ``transform.resize`` is
replaced by the identity because the image is already at its test size (detkit does not resize
inside the model either).
``--size`` is ignored; ``--threads``, ``--repeats`` (>= 5 recommended), ``--warmup``, ``--device``
apply. Ratio = detkit time / torchvision time (lower is better; target <= 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import count_params, markdown_table, sync

HEIGHT, WIDTH = 800, 1333


def build_pair(device: str = "cpu"):
    """(torchvision model, detkit model) with the same weights, both in eval mode."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    from detkit.models import build_model
    from detkit.models.convert import load_torchvision_weights

    torch.manual_seed(0)
    # what fasterrcnn_resnet50_fpn(weights=...) builds: FrozenBN, 3 trainable stages, 91 classes
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    tv = FasterRCNN(backbone, num_classes=91, min_size=HEIGHT, max_size=WIDTH)
    tv.transform.resize = lambda image, target=None: (image, target)
    model = build_model({
        "type": "TwoStageDetector", "num_classes": 90,
        "backbone": {"type": "ResNet", "depth": 50, "norm": "FrozenBN", "frozen_stages": 1},
        "neck": {"type": "FPN", "out_channels": 256, "extra_levels": "maxpool"},
        "rpn": {"type": "RPNHead", "stride_mode": "torchvision"},
        "roi_head": {"type": "RoIHead", "box_head": {"type": "TwoMLPHead", "fc_dim": 1024}},
    })
    load_torchvision_weights(model, tv.state_dict())
    return tv.eval().to(device), model.eval().to(device)


@torch.no_grad()
def alternating_times(nets: dict, image, repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds of each timed run per model; runs alternate between the models so that a change of
    machine load during the measurement affects both alike."""
    times: dict[str, list[float]] = {name: [] for name in nets}
    for i in range(warmup + repeats):
        for name, net in nets.items():
            start = time.perf_counter()
            net([image])
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> None:
    tv, model = build_pair(args.device)
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)).to(args.device)
    repeats = max(5, args.repeats)
    with torch.no_grad():
        tv_out, ours_out = tv([image])[0], model([image])[0]
    same = (tv_out["boxes"].shape == ours_out["boxes"].shape
            and bool(torch.allclose(tv_out["boxes"], ours_out["boxes"], atol=1e-2)))
    nets = {"torchvision": tv, "detkit": model}
    runs = alternating_times(nets, image, repeats, args.warmup, args.device)
    times = {name: statistics.median(t) for name, t in runs.items()}
    paired = statistics.median(d / t for d, t in zip(runs["detkit"], runs["torchvision"]))
    rows = [[name, f"{count_params(net) / 1e6:.2f}", f"{times[name] * 1000:.0f}"]
            for name, net in nets.items()]
    ratio = times["detkit"] / times["torchvision"]
    print(markdown_table(["model", "params (M)", "median ms / image"], rows))
    print(f"\nratio detkit / torchvision: {ratio:.3f} (target <= 1.0; median of per-run ratios "
          f"{paired:.3f}); input {HEIGHT}x{WIDTH}, batch 1, "
          f"{repeats} timed runs after {args.warmup} warm-up, threads {torch.get_num_threads()}, "
          f"device {args.device}; identical detections: {same} ({len(ours_out['boxes'])} boxes)")
