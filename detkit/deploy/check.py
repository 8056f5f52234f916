"""Check an exported model against PyTorch on real-looking images (the synthetic shapes scenes).

Legend: B images, K output rows, H x W the input size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

__all__ = ["sample_images", "compare_detections", "check_export"]


def sample_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Float[B,3,H,W]: synthetic shapes scenes (several objects each) resized to H x W."""
    import cv2

    from detkit.data.shapes import render_image

    images = []
    for i in range(batch):
        image = render_image(seed, "val", i, max(height, width))[0]
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    # Light sensor-like noise: the generator's flat backgrounds would otherwise give many exactly
    # equal scores, whose order (and NMS's choice among them) no runtime defines.
    noise = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    return (torch.stack(images) + (noise - 0.5) * (4 / 255)).clamp(0, 1)


def compare_detections(onnx_out: dict[str, np.ndarray], reference: list[dict], image_size: int,
                       box_tol: float = 1e-4, score_tol: float = 1e-4) -> list[str]:
    """Differences between exported outputs and ``model(images)`` results; empty = equal.

    Detections must agree in number and one to one: same label, score within ``score_tol``,
    box corners within ``box_tol * image_size`` pixels. They are matched as sets, so two
    detections whose scores differ by less than the float noise may swap places.
    """
    problems = []
    for i, ref in enumerate(reference):
        if "sem_seg" in onnx_out:
            agree = float((onnx_out["sem_seg"][i] == ref["sem_seg"].numpy()).mean())
            if agree < 0.999:
                problems.append(f"image {i}: sem_seg agrees on {agree:.4%} of the pixels")
            continue
        n = int(onnx_out["num_detections"][i])
        if n != len(ref["boxes"]):
            problems.append(f"image {i}: {n} detections, PyTorch {len(ref['boxes'])}")
            continue
        unmatched = _unmatched(onnx_out["boxes"][i, :n], onnx_out["scores"][i, :n],
                               onnx_out["labels"][i, :n], ref, box_tol * image_size, score_tol)
        if unmatched:
            j = unmatched[0]
            problems.append(f"image {i}: {len(unmatched)} of {n} PyTorch detections have no "
                            f"equal in the exported output, e.g. #{j}: label "
                            f"{int(ref['labels'][j])}, score {float(ref['scores'][j]):.6f}, "
                            f"box {ref['boxes'][j].tolist()}")
    return problems


def _unmatched(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, ref: dict,
               box_tol: float, score_tol: float) -> list[int]:
    """Indices of reference detections without an equal (unused) exported row."""
    ref_boxes, ref_scores = ref["boxes"].numpy(), ref["scores"].numpy()
    ref_labels = ref["labels"].numpy()
    close = ((np.abs(boxes[None] - ref_boxes[:, None]).max(-1, initial=0.0) <= box_tol)
             & (np.abs(scores[None] - ref_scores[:, None]) <= score_tol)
             & (labels[None] == ref_labels[:, None]))                  # [n_ref, n]
    used = np.zeros(len(scores), bool)
    missing = []
    for j in range(len(ref_scores)):
        free = np.flatnonzero(close[j] & ~used)
        if len(free):
            used[free[0]] = True
        else:
            missing.append(j)
    return missing


def check_export(model: torch.nn.Module, path: Path, height: int, width: int, batch: int,
                 box_tol: float = 1e-4, score_tol: float = 1e-4) -> list[str]:
    """Run onnxruntime and the PyTorch model (eval copy) on the same shapes images."""
    from detkit.deploy.onnx_runtime import OnnxRuntimeModel

    images = sample_images(batch, height, width)
    reference_model = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        reference = reference_model(list(images))
    outputs = OnnxRuntimeModel(path)(images.numpy())
    return compare_detections(outputs, reference, max(height, width), box_tol, score_tol)
