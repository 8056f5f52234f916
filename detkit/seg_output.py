"""Semantic-segmentation outputs of ``tools/infer.py``: PNGs in the dataset's own mask values, and a
legend (class colour + name) on the drawn overlays.

Images are H x W x 3 ``uint8`` RGB; class maps ``sem_seg`` are Int[H,W] of contiguous labels
0..K-1 (what a Segmentor predicts). A dataset with sparse mask values (``classes: {0: background,
7: road, 26: car}``) stores the value of each label as ``label_to_cat_id`` in the checkpoint;
:class:`SegOutputWriter` maps the labels back to those values, so ``tools/eval.py --seg-gt``
scores the written PNGs against the dataset's own masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .data.seg_classes import labels_to_values
from .visualize import class_color

__all__ = ["SegOutputWriter", "draw_seg_legend"]

LEGEND_ROWS = 12    # classes listed at most (the largest areas); the rest as "+N more"


def draw_seg_legend(image: np.ndarray, sem_seg, class_names: Sequence[str], *,
                    skip_labels: Sequence[int] = (), ignore_index: int = 255) -> np.ndarray:
    """A new image with a legend in the top-left corner: one colour swatch (``class_color`` of
    the label, as ``blend_sem_seg`` paints it) and name per label present in Int[H,W]
    ``sem_seg``, largest area first; ``skip_labels`` (an unpainted background) are left out."""
    labels, counts = np.unique(_as_array(sem_seg), return_counts=True)
    keep = [(int(n), int(lab)) for lab, n in zip(labels, counts)
            if lab >= 0 and lab != ignore_index and int(lab) not in skip_labels]
    entries = [lab for _, lab in sorted(keep, key=lambda t: (-t[0], t[1]))]
    out = np.ascontiguousarray(image.copy())
    if not entries:
        return out
    shown, hidden = entries[:LEGEND_ROWS], len(entries) - LEGEND_ROWS
    texts = [class_names[lab] if 0 <= lab < len(class_names) else str(lab) for lab in shown]
    if hidden > 0:
        texts.append(f"+{hidden} more")
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, max(out.shape[:2]) / 1000)
    (_, text_h), baseline = cv2.getTextSize("Ag", font, scale, 1)
    row = text_h + baseline + 4
    swatch = text_h + baseline
    width = 6 + swatch + max(cv2.getTextSize(t, font, scale, 1)[0][0] for t in texts) + 6
    height = 4 + row * len(texts)
    x1, y1 = min(width, out.shape[1]), min(height, out.shape[0])
    # A dark, half-transparent panel: the legend reads on any picture and hides little of it.
    out[:y1, :x1] = (out[:y1, :x1].astype(np.float32) * 0.4).astype(np.uint8)
    for i, text in enumerate(texts):
        top = 4 + i * row
        if i < len(shown):
            cv2.rectangle(out, (4, top), (4 + swatch - 1, top + swatch - 1), class_color(shown[i]), -1)
        cv2.putText(out, text, (8 + swatch, top + text_h + 1), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _as_array(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x).astype(np.int64)


class SegOutputWriter:
    """Writes a Segmentor's class maps as PNGs in the dataset's values and draws their legend.

    Args:
        class_names: the predictor's class names; one per label, or without the background
            that label 0 then is (a ``CocoDetection`` with ``with_masks``).
        label_to_cat_id: the mask value of each label (a checkpoint's stored ``label_to_cat_id``);
            used when it has one value per label, else labels are written as they are.
        num_labels: the number of labels of the model's class maps (``model.num_classes``).
        skip_labels: labels left unpainted and out of the legend (a background class).
    """

    def __init__(self, *, class_names: Sequence[str], label_to_cat_id: Sequence[int] | None,
                 num_labels: int | None, skip_labels: Sequence[int] = ()):
        names = [str(n) for n in class_names]
        n = int(num_labels) if num_labels else len(names)
        self.label_names = ["background", *names] if len(names) == n - 1 else names
        values = list(label_to_cat_id or [])
        self.values = [int(v) for v in values] if len(values) == n and max(values, default=0) <= 255 else None
        self.skip_labels = tuple(skip_labels)

    def to_png_values(self, sem_seg) -> np.ndarray:
        """Int[H,W] labels -> UInt8[H,W] in the dataset's mask values (labels as they are without)."""
        labels = _as_array(sem_seg)
        if self.values is None:
            return labels.astype(np.uint8)
        return labels_to_values(labels, self.values)

    def write_png(self, path: Path, sem_seg) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), self.to_png_values(sem_seg)):
            raise OSError(f"cannot write {path}")

    def legend(self, image: np.ndarray, sem_seg) -> np.ndarray:
        return draw_seg_legend(image, sem_seg, self.label_names, skip_labels=self.skip_labels)
