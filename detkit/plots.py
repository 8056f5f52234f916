"""Pictures of a training run, drawn from plain arrays and records (no model, no config).

* :func:`plot_results` - loss and metric curves from ``metrics.jsonl`` records (``results.png``)
* :func:`plot_confusion_matrix` - a :class:`~detkit.evaluation.confusion.DetectionConfusionMatrix`
  (``confusion_matrix.png``)
* :func:`plot_labels` - the label distribution of a dataset (``labels.png``)
* :func:`prediction_grid` - val images, ground truth beside predictions (``val_predictions.jpg``)

Boxes are ``xyxy`` absolute pixels of the image they belong to; images are UInt8[H,W,3] RGB.
Figures are bare ``matplotlib.figure.Figure`` objects rendered by the Agg canvas: no display is
needed and pyplot's global state is left alone (training may run in a notebook).
:func:`detkit.engine.plots.write_plots` gathers the inputs from a work dir.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from .visualize import draw_boxes

__all__ = ["plot_results", "plot_confusion_matrix", "plot_labels", "prediction_grid",
           "is_per_class_key", "GridSample"]

# Validation curves drawn per task when present (others are drawn when none of these exist).
_MAIN_METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AR100", "segm/AP", "segm/AP50",
                 "voc/mAP", "sem_seg/mIoU", "sem_seg/PA", "sem_seg/MPA")


def is_per_class_key(key: str) -> bool:
    """``bbox/AP-cat``, ``voc/AP-dog``, ``sem_seg/IoU-road``: a metric of one class."""
    return "-" in key.rsplit("/", 1)[-1]


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    return fig, axes


def _save(fig, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def _numeric(record: dict, key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["iter"], v) for r in records if (v := _numeric(r, key)) is not None and "iter" in r]
    arr = np.asarray(points, np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _curve_keys(records: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(train keys: ``loss`` first, the loss terms, ``lr``), (main val metrics, at most 8)."""
    train = [r for r in records if r.get("mode") == "train"]
    val = [r for r in records if r.get("mode") == "val"]
    seen_train = dict.fromkeys(k for r in train for k in r
                               if k.startswith("loss") and _numeric(r, k) is not None)
    train_keys = sorted(seen_train, key=lambda k: (k != "loss", k))
    if any(_numeric(r, "lr") is not None for r in train):
        train_keys.append("lr")
    val_seen = dict.fromkeys(k for r in val for k in r
                             if k not in ("iter", "epoch", "mode") and _numeric(r, k) is not None
                             and not is_per_class_key(k))
    val_keys = [k for k in _MAIN_METRICS if k in val_seen] or list(val_seen)
    return train_keys, val_keys[:8]


def plot_results(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Loss terms, lr and the main val metrics over iterations, one panel each.

    ``records``: the dicts of ``metrics.jsonl`` (``mode`` ``train`` / ``val``, ``iter``).
    """
    train_keys, val_keys = _curve_keys(records)
    panels = [("train", k) for k in train_keys] + [("val", k) for k in val_keys]
    if not panels:
        raise ValueError("no loss or metric values to plot")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure(rows, cols, 3.2 * cols, 2.5 * rows)
    for ax, (mode, key) in zip(axes, panels):
        x, y = _series([r for r in records if r.get("mode") == mode], key)
        ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3,
                color="tab:blue" if mode == "train" else "tab:orange", linewidth=1.2)
        if mode == "train" and key != "lr" and len(y) >= 8:   # the trend through the noise
            k = max(2, len(y) // 10)
            ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color="k",
                    linewidth=0.8, alpha=0.6)
        ax.set_title(f"{mode} {key}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str | Path, *,
                          title: str = "") -> Path:
    """Draw Int[C+1, C+1] counts (rows ground truth, columns prediction, last = background).

    Colours are each row divided by its sum (which share of a class's boxes went where; the
    background row: which classes the false positives claimed); cells print the counts when
    C <= 30.
    """
    matrix = np.asarray(matrix, np.int64)
    n = len(names)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix of shape {matrix.shape} for {n} names")
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(max(4.5, 0.35 * n + 2.5), 24.0)
    fig, axes = _figure(1, 1, side + 1.0, side)
    ax = axes[0]
    shown = np.where(matrix > 0, fractions, np.nan)   # zero cells stay white
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    font = 8 if n <= 12 else (6 if n <= 30 else 4)
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 31:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=font,
                        color="white" if fractions[i, j] > 0.6 else "black")
    ax.set_title(title or "confusion matrix", fontsize=9)
    return _save(fig, path)


def plot_labels(boxes: np.ndarray, labels: np.ndarray, image_sizes: np.ndarray,
                boxes_per_image: np.ndarray, class_names: Sequence[str], path: str | Path, *,
                title: str = "") -> Path:
    """Instances per class, box centres, box sizes and boxes per image of a dataset.

    ``boxes`` Float[N,4] xyxy, ``labels`` Int[N], ``image_sizes`` Float[N,2] (H, W) of each
    box's image, ``boxes_per_image`` Int[I].
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
    fig, axes = _figure(2, 2, 10, 8)
    counts = np.bincount(labels, minlength=len(class_names))[: len(class_names)]
    axes[0].bar(range(len(counts)), counts, color="tab:blue")
    font = 8 if len(class_names) <= 20 else 5
    axes[0].set_xticks(range(len(counts)), class_names, rotation=90, fontsize=font)
    axes[0].set_ylabel("instances")
    axes[0].set_title(f"{len(labels)} boxes, {len(class_names)} classes", fontsize=9)
    wh = sizes[:, ::-1]
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2) / np.maximum(wh, 1)
    extents = (boxes[:, 2:] - boxes[:, :2]) / np.maximum(wh, 1)
    for ax, xy, (xl, yl) in ((axes[1], centres, ("x centre / width", "y centre / height")),
                             (axes[2], extents, ("box width / image width", "box height / image height"))):
        if len(xy) > 2000:   # a density; single points would be one blot
            ax.hist2d(xy[:, 0], xy[:, 1], bins=50, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
        elif len(xy):
            ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5, color="tab:blue", linewidths=0)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xl, ylabel=yl)
    axes[1].invert_yaxis()   # image coordinates: y grows downwards
    per_image = np.asarray(boxes_per_image, np.int64).reshape(-1)
    top = int(per_image.max(initial=0))
    axes[3].hist(per_image, bins=np.arange(top + 2) - 0.5, color="tab:blue")
    axes[3].set(xlabel="boxes per image", ylabel="images")
    axes[3].set_title(f"{len(per_image)} images, {int((per_image == 0).sum())} without boxes",
                      fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


GridSample = Mapping   # {"image", "gt_boxes", "gt_labels", "boxes", "labels", "scores"}


def _tile(image: np.ndarray, boxes, labels, scores, class_names, side: int) -> np.ndarray:
    """The image fitted into side x side (aspect kept, grey padding) with its boxes drawn."""
    h, w = image.shape[:2]
    s = side / max(h, w)
    resized = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                         interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * s
    drawn = draw_boxes(resized, boxes, labels, scores, class_names)
    canvas = np.full((side, side, 3), 114, np.uint8)
    canvas[: drawn.shape[0], : drawn.shape[1]] = drawn
    return canvas


def _header(text: str, width: int) -> np.ndarray:
    bar = np.full((22, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def prediction_grid(samples: Sequence[GridSample], class_names: Sequence[str], path: str | Path, *,
                    side: int = 320, pairs_per_row: int = 2, score_thr: float = 0.25) -> Path:
    """Write a JPEG: per sample, ground truth (left) beside predictions >= ``score_thr`` (right).

    Each sample holds ``image`` UInt8[H,W,3] RGB, ``gt_boxes`` Float[N,4], ``gt_labels`` Int[N],
    ``boxes`` Float[K,4], ``labels`` Int[K], ``scores`` Float[K] (original-image pixels).
    """
    if not samples:
        raise ValueError("no images for the prediction grid")
    tiles = []
    for sample in samples:
        scores = np.asarray(sample["scores"], np.float64).reshape(-1)
        keep = scores >= score_thr
        gt = _tile(sample["image"], sample["gt_boxes"], sample["gt_labels"], None, class_names, side)
        pred = _tile(sample["image"], np.asarray(sample["boxes"]).reshape(-1, 4)[keep],
                     np.asarray(sample["labels"]).reshape(-1)[keep], scores[keep], class_names, side)
        gt = np.concatenate([_header("ground truth", side), gt])
        pred = np.concatenate([_header(f"predictions, score >= {score_thr:g}", side), pred])
        tiles.append(np.concatenate([gt, np.full((side + 22, 4, 3), 255, np.uint8), pred], axis=1))
    rows = []
    for start in range(0, len(tiles), pairs_per_row):
        row = tiles[start:start + pairs_per_row]
        row += [np.full_like(tiles[0], 255)] * (pairs_per_row - len(row))
        gap = np.full((row[0].shape[0], 12, 3), 255, np.uint8)
        rows.append(np.concatenate([x for t in row for x in (t, gap)], axis=1))
    grid = np.concatenate([x for r in rows for x in (r, np.full((8, r.shape[1], 3), 255, np.uint8))])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85]):
        raise OSError(f"could not write {path}")
    return path
