"""Drawing predictions on images: boxes with class name and score, semantic masks blended in.

Images are ``np.ndarray`` H x W x 3 ``uint8`` RGB (what ``detkit.data.io.read_image`` returns);
boxes are xyxy absolute pixels of that image. Every function returns a new array and leaves its
input untouched. Each class gets a fixed colour (``class_color``), the same in every image, so
pictures of one model are comparable at a glance.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np
import torch

__all__ = ["class_color", "draw_boxes", "blend_sem_seg", "blend_instance_masks", "draw_result"]

_GOLDEN = 0.618033988749895


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for class ``label``; neighbouring labels get very different hues."""
    hue = (0.08 + int(label) * _GOLDEN) % 1.0
    # Alternate brightness so that hues that land close together stay distinguishable.
    value = 1.0 if int(label) % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} "
                         f"dtype {image.dtype}")
    return image


def _caption(label: int, score: float | None, class_names: Sequence[str] | None) -> str:
    name = class_names[label] if class_names is not None and 0 <= label < len(class_names) \
        else str(label)
    return name if score is None else f"{name} {score:.2f}"


def draw_boxes(image: np.ndarray, boxes, labels, scores=None,
               class_names: Sequence[str] | None = None, *, thickness: int | None = None,
               font_scale: float | None = None) -> np.ndarray:
    """Draw Float[K,4] xyxy ``boxes`` with a ``"name score"`` caption in the class colour.

    ``labels`` Int[K] index ``class_names`` (the number is printed when a name is missing);
    ``scores`` Float[K] is optional. Line width and font size follow the image size so captions
    stay legible on 128 px and 2000 px images alike. Returns a new HxWx3 uint8 RGB array.
    """
    canvas = np.ascontiguousarray(_check_image(image).copy())
    boxes = _as_numpy(boxes).reshape(-1, 4)
    labels = _as_numpy(labels).reshape(-1).astype(np.int64)
    scores = None if scores is None else _as_numpy(scores).reshape(-1)
    if len(boxes) != len(labels) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"draw_boxes: {len(boxes)} boxes, {len(labels)} labels, "
                         f"{None if scores is None else len(scores)} scores")
    h, w = canvas.shape[:2]
    size = max(h, w)
    thickness = thickness or max(1, int(round(size / 320)))
    font_scale = font_scale or max(0.3, size / 1000)
    # Low scores first, so that the most confident boxes end up on top.
    order = np.argsort(scores) if scores is not None else np.arange(len(boxes))
    for i in order:
        color = class_color(int(labels[i]))
        x0, y0, x1, y1 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), color, thickness, cv2.LINE_8)
        text = _caption(int(labels[i]), None if scores is None else float(scores[i]), class_names)
        _put_caption(canvas, text, (x0, y0), color, font_scale)
    return canvas


def _put_caption(canvas: np.ndarray, text: str, corner: tuple[int, int], color,
                 font_scale: float) -> None:
    """Caption on a filled box just above ``corner`` (inside the image when there is no room)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), baseline = cv2.getTextSize(text, font, font_scale, 1)
    h, w = canvas.shape[:2]
    x = min(max(corner[0], 0), max(w - tw - 2, 0))
    y_top = corner[1] - th - baseline - 2
    if y_top < 0:
        y_top = max(corner[1], 0)
    y_top = min(y_top, max(h - th - baseline - 2, 0))
    cv2.rectangle(canvas, (x, y_top), (x + tw + 2, y_top + th + baseline + 2), color, -1)
    # Black or white text, whichever reads better on the class colour.
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 1, y_top + th + 1), font, font_scale, text_color, 1, cv2.LINE_AA)


def blend_sem_seg(image: np.ndarray, sem_seg, *, alpha: float = 0.5, ignore_index: int = 255,
                  skip_labels: Sequence[int] = ()) -> np.ndarray:
    """Blend an Int[H,W] class map into the image: ``out = (1 - alpha) * image + alpha * colour``.

    Pixels labelled ``ignore_index`` or one of ``skip_labels`` (e.g. a background class) are left
    unchanged. The map must have the image's size. Returns a new HxWx3 uint8 RGB array.
    """
    image = _check_image(image)
    seg = _as_numpy(sem_seg).astype(np.int64)
    if seg.shape != image.shape[:2]:
        raise ValueError(f"blend_sem_seg: mask shape {seg.shape} != image size {image.shape[:2]}")
    out = image.astype(np.float32)
    for label in np.unique(seg):
        if label == ignore_index or label in skip_labels or label < 0:
            continue
        region = seg == label
        out[region] = (1.0 - alpha) * out[region] + alpha * np.asarray(class_color(int(label)),
                                                                       np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def blend_instance_masks(image: np.ndarray, masks, labels, *, alpha: float = 0.5) -> np.ndarray:
    """Blend Bool[K,H,W] instance masks into the image in their class colours (later masks on
    top), each outlined so that touching instances of one class stay apart. Returns a new array."""
    out = _check_image(image).astype(np.float32)
    masks, labels = _as_numpy(masks).astype(bool), _as_numpy(labels).astype(np.int64).reshape(-1)
    if masks.shape[1:] != out.shape[:2]:
        raise ValueError(f"blend_instance_masks: mask size {masks.shape[1:]} != image size {out.shape[:2]}")
    for mask, label in zip(masks, labels):
        color = np.asarray(class_color(int(label)), np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * color
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(float(c) for c in color), 1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_result(image: np.ndarray, result: dict, class_names: Sequence[str] | None = None, *,
                score_thr: float = 0.0, alpha: float = 0.5,
                seg_skip_labels: Sequence[int] = ()) -> np.ndarray:
    """Draw one prediction dict (``boxes``/``scores``/``labels``, Mask R-CNN's ``masks``, and/or
    ``sem_seg``) on ``image``.

    The mask is blended first so that boxes and captions stay crisp on top of it; boxes scoring
    below ``score_thr`` are not drawn.
    """
    out = _check_image(image)
    if result.get("sem_seg") is not None:
        out = blend_sem_seg(out, result["sem_seg"], alpha=alpha, skip_labels=seg_skip_labels)
    if result.get("boxes") is not None and len(result["boxes"]):
        scores = result.get("scores")
        keep = slice(None) if scores is None else _as_numpy(scores) >= score_thr
        boxes = _as_numpy(result["boxes"])[keep]
        labels = _as_numpy(result["labels"])[keep]
        if result.get("masks") is not None:
            out = blend_instance_masks(out, _as_numpy(result["masks"])[keep], labels, alpha=alpha)
        out = draw_boxes(out, boxes, labels, None if scores is None else _as_numpy(scores)[keep],
                         class_names)
    return out.copy() if out is image else out
