"""``write_plots(work_dir)``: the pictures of a finished or running training run.

Written into the work dir (and, when it has ``tensorboard/`` events, as images there too):

* ``results.png`` - loss terms, lr and the main val metrics from ``metrics.jsonl``;
* ``labels.png`` - the label distribution of ``data.train`` (annotations only, no images read);
* ``confusion_matrix.png`` and ``val_predictions.jpg`` - the weights of the newest checkpoint
  (``last.pth``, else ``final.pth`` / ``best.pth``; EMA weights when present: the weights the
  trainer evaluates) run over ``data.val`` with the val pipeline, accumulated by
  :class:`~detkit.evaluation.confusion.DetectionConfusionMatrix` (IoU >= 0.5, score >= 0.25 by
  default) and the first ``grid_images`` images drawn with their ground truth. At the end of
  training that is the final evaluation's model; for a running run the last saved one.

Each picture is made on its own: one that cannot be made (a pre-training run has no val set, a
segmentation model no boxes) is reported through ``log`` and the others are still written.
"""

from __future__ import annotations

import json
import os
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import plots

__all__ = ["write_plots", "read_records", "PLOT_FILES", "END_OF_TRAINING_MAX_IMAGES"]

PLOT_FILES = ("results.png", "labels.png", "confusion_matrix.png", "val_predictions.jpg")
CHECKPOINT_ORDER = ("last.pth", "final.pth", "best.pth")
# The end of training re-runs the model over the val set for the confusion matrix; past this many
# images it uses the first ones (the title says how many of how many) so that a large val set
# (COCO's 5000) does not add minutes to every run. tools/plot.py uses every image by default.
END_OF_TRAINING_MAX_IMAGES = 1000


def read_records(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line cut by a crash or still being written is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _leaves(dataset, depth: int = 0) -> list:
    """The datasets with annotation ``records`` inside wrappers (mosaic, concat, subset)."""
    if hasattr(dataset, "records") or depth > 8:
        return [dataset] if hasattr(dataset, "records") else []
    inner = list(getattr(dataset, "datasets", None) or []) + [getattr(dataset, "dataset", None)]
    return [leaf for d in inner if d is not None for leaf in _leaves(d, depth + 1)]


def _labels_png(cfg: dict, out: Path) -> Path:
    from ..data import build_dataset

    data = cfg.get("data") or {}
    if data.get("train") is None:
        raise ValueError("the config has no data.train")
    dataset = build_dataset(data["train"], root=data.get("root"), path="data.train")
    leaves = _leaves(dataset)
    records = [r for leaf in leaves for r in leaf.records]
    if not any(len(r.labels) for r in records):   # e.g. a semantic-segmentation dataset
        raise ValueError("data.train has no box annotations")
    boxes = np.concatenate([r.boxes.reshape(-1, 4) for r in records])
    labels = np.concatenate([r.labels.reshape(-1) for r in records])
    sizes = np.concatenate([np.tile([[r.height, r.width]], (len(r.labels), 1)) for r in records])
    per_image = np.array([len(r.labels) for r in records])
    names = list(getattr(leaves[0], "class_names", None) or range(int(labels.max(initial=0)) + 1))
    return plots.plot_labels(boxes, labels, sizes, per_image, [str(n) for n in names], out,
                             title=f"data.train: {len(records)} images")


def _newest_checkpoint(work_dir: Path) -> Path:
    for name in CHECKPOINT_ORDER:
        if (work_dir / name).is_file():
            return work_dir / name
    raise FileNotFoundError(f"no checkpoint ({', '.join(CHECKPOINT_ORDER)}) in {work_dir}")


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@torch.no_grad()
def _val_pass(cfg: dict, checkpoint: Path, device: torch.device, max_images: int | None,
              grid_images: int, score_thr: float, iou_thr: float):
    """(confusion matrix accumulator, grid samples, images seen, val size, checkpoint iteration)."""
    from ..data import build_dataloader, build_dataset
    from ..evaluation.confusion import DetectionConfusionMatrix
    from ..models import build_model
    from .architecture import describe_checkpoint
    from .checkpoint import inference_state_dict, load_checkpoint, load_model_weights

    data = cfg.get("data") or {}
    if data.get("val") is None:
        raise ValueError("the config has no data.val")
    dataset = build_dataset(data["val"], root=data.get("root"), path="data.val")
    loader = build_dataloader(data["val"], dataset, train=False, seed=0)
    ckpt = load_checkpoint(checkpoint)
    model = build_model(cfg["model"]).to(device).eval()
    load_model_weights(model, inference_state_dict(ckpt), source=str(checkpoint),
                       architecture=describe_checkpoint(ckpt))
    leaf = (_leaves(dataset) or [dataset])[0]
    stored = (ckpt.get("meta") or {}).get("class_names", [])
    names = [str(n) for n in getattr(leaf, "class_names", None) or stored]
    confusion = DetectionConfusionMatrix(num_classes=max(len(names), 1), class_names=names or None,
                                         score_thr=score_thr, iou_thr=iou_thr)
    batch_size = max(1, int(getattr(loader, "batch_size", None) or 1))
    batches = islice(loader, None if max_images is None else -(-max_images // batch_size))
    samples: list[dict] = []
    seen = 0
    for images, targets in batches:
        predictions = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in p.items()}
                       for p in model([im.to(device) for im in images], targets)]
        if predictions and "boxes" not in predictions[0]:
            raise ValueError(f"{type(model).__name__} predicts no boxes (a segmentation model?)")
        confusion.process(targets, predictions)
        seen += len(images)
        for target, pred in zip(targets, predictions):
            if len(samples) < grid_images:
                samples.append(_grid_sample(leaf, int(target["image_id"]), pred))
    return confusion, samples, seen, len(dataset), ckpt.get("iter")


def _grid_sample(dataset, image_id: int, pred: dict) -> dict:
    """The original image and its ground truth (from the dataset's records) with ``pred``."""
    index = next(i for i, r in enumerate(dataset.records) if r.image_id == image_id)
    raw = dataset.get_raw(index)
    return {"image": raw["image"], "gt_boxes": raw["boxes"], "gt_labels": raw["labels"],
            "boxes": pred["boxes"].float().numpy(), "labels": pred["labels"].numpy(),
            "scores": pred["scores"].float().numpy()}


def _to_tensorboard(work_dir: Path, written: dict[str, Path], step: int) -> None:
    import cv2
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(work_dir / "tensorboard"))
    try:
        for name, path in written.items():
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                writer.add_image(f"plots/{Path(name).stem}", image[:, :, ::-1].copy(), step,
                                 dataformats="HWC")
    finally:
        writer.close()


def write_plots(work_dir: str | Path, *, cfg: dict | None = None, checkpoint: str | Path | None = None,
                device: str | torch.device | None = None, max_images: int | None = None,
                grid_images: int = 8, score_thr: float = 0.25, iou_thr: float = 0.5,
                tensorboard: bool | None = None,
                log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write the :data:`PLOT_FILES` that can be made; returns ``{file name: path}``.

    ``cfg``: the run's config (default: ``work_dir/config.yaml``). ``checkpoint``: the weights of
    the val pictures (default: the newest of ``last.pth``, ``final.pth``, ``best.pth``).
    ``max_images``: val images for the confusion matrix (default all). ``tensorboard``: add the
    pictures to ``work_dir/tensorboard`` (default: when that folder exists).
    """
    from ..config import load_config

    work_dir = Path(work_dir)
    written: dict[str, Path] = {}
    step = 0

    def attempt(name: str, make: Callable[[Path], Path]) -> None:
        try:
            written[name] = make(work_dir / name)
        except Exception as e:  # noqa: BLE001 - one missing picture must not cost the others
            log(f"plots: {name} not written: {e}")

    metrics = work_dir / "metrics.jsonl"
    records = read_records(metrics) if metrics.is_file() else []
    step = max((int(r.get("iter", 0)) for r in records), default=0)
    attempt("results.png", lambda out: plots.plot_results(records, out, title=work_dir.name))
    cfg = cfg if cfg is not None else load_config(work_dir / "config.yaml")
    attempt("labels.png", lambda out: _labels_png(cfg, out))
    try:
        ckpt_path = Path(checkpoint) if checkpoint is not None else _newest_checkpoint(work_dir)
        dev = torch.device(device) if device is not None else _default_device()
        confusion, samples, seen, total, it = _val_pass(cfg, ckpt_path, dev, max_images, grid_images,
                                                        score_thr, iou_thr)
    except Exception as e:  # noqa: BLE001
        log(f"plots: confusion_matrix.png and val_predictions.jpg not written: {e}")
    else:
        title = (f"{ckpt_path.name} (iteration {it}), {seen} of {total} val images; "
                 f"IoU >= {iou_thr:g}, score >= {score_thr:g}")
        attempt("confusion_matrix.png", lambda out: plots.plot_confusion_matrix(
            confusion.evaluate(), confusion.names, out, title=title))
        attempt("val_predictions.jpg", lambda out: plots.prediction_grid(
            samples, confusion.names[:-1], out, score_thr=score_thr))
    if tensorboard or (tensorboard is None and (work_dir / "tensorboard").is_dir()):
        try:
            _to_tensorboard(work_dir, written, step)
        except Exception as e:  # noqa: BLE001
            log(f"plots: not added to TensorBoard: {e}")
    return written
