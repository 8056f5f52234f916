"""Mask paste: 100 detections' 28 x 28 mask probabilities into an 800 x 1333 image.

detkit's ``paste_masks`` (two batched matrix products, ``detkit.models.mask_paste``) against
torchvision's ``paste_masks_in_image`` (one ``interpolate`` + one image-sized copy per detection)
on the same masks and boxes: boxes of 16-500 px at random places, clipped to the image like
detections (many touch a border). Timed: torchvision's call (float probabilities
Float[N,1,H,W]), detkit's with ``threshold=None`` (the same float output) and with the 0.5
threshold Mask R-CNN uses (Bool[N,H,W]; torchvision's result is then binarised as well), the
calls alternating run by run. ``--size`` is ignored; ``--threads``, ``--repeats``, ``--warmup``,
``--device`` apply. Ratio = detkit / torchvision (target <= 2.0). The output columns compare
detkit's result with torchvision's: largest difference of the probabilities, how many of the
N x H x W values differ at all, and how many binarised pixels differ (target 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import markdown_table, sync

NUM, HEIGHT, WIDTH, SIZE = 100, 800, 1333, 28


def detections(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Float[N,28,28] mask probabilities and Float[N,4] xyxy boxes inside the image."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(NUM, SIZE, SIZE, generator=g)
    centre = torch.rand(NUM, 2, generator=g) * torch.tensor([WIDTH, HEIGHT])
    half = (16 + torch.rand(NUM, 2, generator=g) * 484) / 2
    boxes = torch.cat([centre - half, centre + half], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, WIDTH)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, HEIGHT)
    return probs.to(device), boxes.to(device)


def run(args: argparse.Namespace) -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from detkit.models.mask_paste import paste_masks

    probs, boxes = detections(args.device)
    size = (HEIGHT, WIDTH)
    calls = {"torchvision paste_masks_in_image": lambda: paste_masks_in_image(probs[:, None], boxes, size),
             "detkit paste_masks, threshold=None": lambda: paste_masks(probs, boxes, size, threshold=None),
             "detkit paste_masks, threshold=0.5": lambda: paste_masks(probs, boxes, size)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.warmup):
        for fn in calls.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in calls.items():
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    expected = calls["torchvision paste_masks_in_image"]()[:, 0]
    floats = calls["detkit paste_masks, threshold=None"]()
    binary = calls["detkit paste_masks, threshold=0.5"]()
    base = statistics.median(times["torchvision paste_masks_in_image"])
    rows = []
    for name, samples in times.items():
        ms = statistics.median(samples)
        if name.startswith("torchvision"):
            rows.append([name, f"{ms * 1e3:.0f} ms", "1.00", "-", "-", "-"])
            continue
        if "0.5" in name:
            diff = ["-", "-", str(int((binary != (expected > 0.5)).sum()))]
        else:
            diff = [f"{(floats - expected).abs().max().item():.1e}", str(int((floats != expected).sum())),
                    str(int(((floats > 0.5) != (expected > 0.5)).sum()))]
        rows.append([name, f"{ms * 1e3:.0f} ms", f"{ms / base:.2f}", *diff])
    print(markdown_table(["paste of 100 masks, 800 x 1333", "median time", "ratio", "max |p - p_tv|",
                          "values differing", "binarised pixels differing"], rows))
    print(f"\n{NUM} x {HEIGHT} x {WIDTH} = {NUM * HEIGHT * WIDTH} values per output\n")
