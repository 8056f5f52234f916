"""Check an exported model against PyTorch on real-looking images (the synthetic shapes scenes).

Legend: B images, K output rows, H x W the input size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

__all__ = ["sample_images", "compare_detections", "compare_results", "check_export", "TIE_TOL"]

TIE_TOL = 1e-6   # scores this close are a tie: their order in top-k / NMS is not defined


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
    box corners within ``box_tol * image_size`` pixels (coordinates, not IoU: the zero-area boxes
    of an untrained model are equal when their corners are). They are matched as sets, so two
    detections whose scores differ by less than the float noise may swap places. A message says
    how many of the unmatched detections tie in score (``TIE_TOL``) with another one: which of tied candidates
    top-k and NMS keep is not defined, so those differences are not errors of the graph.
    """
    problems = []
    for i, ref in enumerate(reference):
        if "sem_seg" in onnx_out:
            agree = float((onnx_out["sem_seg"][i] == ref["sem_seg"].numpy()).mean())
            if agree < 0.999:
                problems.append(f"image {i}: sem_seg agrees on {agree:.4%} of the pixels")
            continue
        n = int(onnx_out["num_detections"][i])
        scores = onnx_out["scores"][i, :n]
        unmatched = _unmatched(onnx_out["boxes"][i, :n], scores, onnx_out["labels"][i, :n], ref,
                               box_tol * image_size, score_tol)
        if n == len(ref["boxes"]) and not unmatched:
            continue
        ties = _tied(ref, unmatched, onnx_out["boxes"][i, :n], scores, onnx_out["labels"][i, :n])
        text = f"image {i}: {n} detections, PyTorch {len(ref['boxes'])}; "
        if unmatched:
            j = unmatched[0]
            text += (f"{len(unmatched)} PyTorch detections have no equal in the exported output "
                     f"({ties} of them tie in score with another detection), e.g. #{j}: label "
                     f"{int(ref['labels'][j])}, score {float(ref['scores'][j]):.6f}, "
                     f"box {ref['boxes'][j].tolist()}")
        else:
            text += "every PyTorch detection has its equal"
        problems.append(text)
    return problems


def compare_results(results: list[dict], reference: list[dict], box_tol_px: float = 0.5,
                    score_tol: float = 1e-4) -> list[str]:
    """``compare_detections`` for per-image result dicts (``DeployedModel`` / ``Predictor``
    outputs: ``boxes`` Float[K,4], ``scores``, ``labels``) against ``model(images)``'s, with the
    box tolerance in pixels; Mask R-CNN ``masks`` are compared by the caller."""
    if "sem_seg" in reference[0]:
        return [p for i, (r, ref) in enumerate(zip(results, reference))
                for p in [_map_difference(i, r["sem_seg"], ref["sem_seg"])] if p]
    k = max([len(r["scores"]) for r in results] + [1])
    arrays: dict[str, np.ndarray] = {
        "boxes": np.zeros((len(results), k, 4), np.float32),
        "scores": np.zeros((len(results), k), np.float32),
        "labels": np.full((len(results), k), -1, np.int64),
        "num_detections": np.array([len(r["scores"]) for r in results], np.int64)}
    for i, r in enumerate(results):
        n = len(r["scores"])
        arrays["boxes"][i, :n] = r["boxes"].numpy()
        arrays["scores"][i, :n] = r["scores"].numpy()
        arrays["labels"][i, :n] = r["labels"].numpy()
    return compare_detections(arrays, reference, 1, box_tol_px, score_tol)


def _map_difference(i: int, got: torch.Tensor, ref: torch.Tensor) -> str:
    if got.shape != ref.shape:
        return f"image {i}: sem_seg {tuple(got.shape)}, PyTorch {tuple(ref.shape)}"
    agree = float((got == ref).float().mean())
    return f"image {i}: sem_seg agrees on {agree:.4%} of the pixels" if agree < 0.999 else ""


def _tied(ref: dict, unmatched: list[int], boxes: np.ndarray, scores: np.ndarray,
          labels: np.ndarray) -> int:
    """How many unmatched reference detections share their score to float noise (``TIE_TOL``)
    with another reference detection, or with an exported detection of another label or place
    (IoU < 0.5, so not the same detection boxed differently). An untrained YOLO scores every
    candidate 0.0050000 +- 1e-7, an untrained CenterNet has equal neighbouring peaks, and the
    K-th place then goes to either of two tied candidates."""
    ref_scores, ref_boxes, ref_labels = ref["scores"].numpy(), ref["boxes"].numpy(), ref["labels"].numpy()
    count = 0
    for j in unmatched:
        other = (np.abs(scores - ref_scores[j]) <= TIE_TOL) & (
            (labels != ref_labels[j]) | (_iou(boxes, ref_boxes[j]) < 0.5))
        count += int((np.abs(ref_scores - ref_scores[j]) <= TIE_TOL).sum() > 1 or other.any())
    return count


def _iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of Float[N,4] xyxy boxes with one box (0 where a union is empty)."""
    lt, rb = np.maximum(boxes[:, :2], box[:2]), np.minimum(boxes[:, 2:], box[2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda b: np.clip(b[..., 2:] - b[..., :2], 0, None).prod(-1)  # noqa: E731
    union = area(boxes) + area(box) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


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
    """Run onnxruntime and the PyTorch model (eval copy) on the same shapes images: once filling
    the input, and (detectors) once with images smaller by half the ``size_divisibility``,
    padded as ``Detector.preprocess`` pads them and fed with their ``image_sizes``."""
    from detkit.deploy.onnx_runtime import OnnxRuntimeModel

    session = OnnxRuntimeModel(path)
    reference_model = copy.deepcopy(model).cpu().eval()
    images = sample_images(batch, height, width)
    with torch.no_grad():
        reference = reference_model(list(images))
    problems = compare_detections(session(images.numpy()), reference, max(height, width),
                                  box_tol, score_tol)
    cut = int(getattr(model, "size_divisibility", 1) or 1) // 2
    if "image_sizes" not in session.input_names or cut == 0 or min(height, width) <= cut:
        return problems
    small = sample_images(batch, height - cut, width - cut, seed=1)
    pixel_mean: torch.Tensor = reference_model.pixel_mean  # type: ignore[assignment]
    mean = pixel_mean.reshape(1, 3, 1, 1)
    padded = torch.nn.functional.pad(small - mean, (0, cut, 0, cut)) + mean
    with torch.no_grad():
        reference = reference_model(list(small))
    outputs = session(padded.numpy(), np.array([[height - cut, width - cut]] * batch))
    return problems + [f"padded input: {p}" for p in compare_detections(
        outputs, reference, max(height, width), box_tol, score_tol)]


def kept_fraction(reference: list[tuple[np.ndarray, np.ndarray]],
                  candidate: list[tuple[np.ndarray, np.ndarray]], iou_thr: float = 0.9) -> float:
    """Share of the reference detections (per image ``(boxes Float[N,4], labels Int64[N])``) that
    a candidate detection of the same label overlaps with IoU >= ``iou_thr`` (1.0 when none)."""
    found = total = 0
    for (ref_boxes, ref_labels), (boxes, labels) in zip(reference, candidate):
        total += len(ref_boxes)
        for box, label in zip(ref_boxes, ref_labels):
            same = labels == label
            if same.any() and _iou(boxes[same], box).max() >= iou_thr:
                found += 1
    return found / total if total else 1.0


def compare_int8(fp32: Path, int8: Path, height: int, width: int, batch: int,
                 score_thr: float = 0.3) -> float:
    """:func:`kept_fraction` of the INT8 model's detections (``int8``: ``.onnx`` or OpenVINO
    ``.xml``) against the FP32 export's on ``batch`` shapes images at ``height`` x ``width``."""
    from .runtime import DeployedModel, default_backend

    images = list(sample_images(batch, height, width, seed=5))
    results = []
    for path in (fp32, int8):
        dets = DeployedModel(path, backend=default_backend(path))(images)
        results.append([(d["boxes"][d["scores"] > score_thr].numpy(),
                         d["labels"][d["scores"] > score_thr].numpy()) for d in dets])
    return kept_fraction(results[0], results[1])
