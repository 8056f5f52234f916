"""Evaluation loop: every rank predicts its shard of the val loader; the evaluator gathers.

Rank 0 shows progress (tqdm, images/s) and reports where the time went: model vs metric.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .dist import get_rank
from .logging import ProgressLines

__all__ = ["inference_on_loader", "build_val", "evaluate_checkpoint"]


def _to_cpu(pred: dict) -> dict:
    return {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in pred.items()}


def _num_images(loader) -> int | None:
    """Images this rank's loader yields (its sampler's length), None when unknown."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if sampler is None:
        sampler = getattr(loader, "sampler", None)
    try:
        return len(sampler)  # type: ignore[arg-type]
    except TypeError:
        return None


def _stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.no_grad()
def inference_on_loader(model: nn.Module, loader, evaluator, device: torch.device, *,
                        progress: bool | None = None,
                        log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Run ``model`` (eval mode) over ``loader`` and return ``evaluator.evaluate()``.

    Must be called on every rank when training with DDP: the loader yields this rank's shard
    and the evaluator gathers all shards (it de-duplicates the images DistributedSampler pads).
    Predictions are mapped to original-image pixels by the model (targets carry the metas).

    Rank 0 shows a tqdm bar in images/s (``progress``; default: when stderr is a terminal) and
    logs one line through ``log`` (default: stderr) splitting the time into data loading, the model
    and the metric (``process`` during the loop + ``evaluate`` at the end).
    """
    from tqdm import tqdm

    main = get_rank() == 0
    show = main and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=_num_images(loader), desc="eval", unit="img", dynamic_ncols=True, leave=False,
               file=sys.stderr, mininterval=0.5, disable=not show)
    # Without a terminal (a log file) the bar is off: plain lines every 30 s say how far it is.
    lines = ProgressLines(_num_images(loader), desc="eval", unit="img", log=log or _stderr_line) \
        if main and not show else None
    was_training = model.training
    model.eval()
    evaluator.reset()
    seconds = {"data": 0.0, "model": 0.0, "process": 0.0}
    images_seen = 0
    start = tick = time.perf_counter()
    try:
        for images, targets in loader:
            now = time.perf_counter()
            seconds["data"], tick = seconds["data"] + now - tick, now
            images = [im.to(device, non_blocking=True) for im in images]
            # Copying to the CPU waits for the device, so the model time includes its queued kernels.
            predictions = [_to_cpu(p) for p in model(images, targets)]
            now = time.perf_counter()
            seconds["model"], tick = seconds["model"] + now - tick, now
            evaluator.process(targets, predictions)
            now = time.perf_counter()
            seconds["process"], tick = seconds["process"] + now - tick, now
            images_seen += len(images)
            bar.update(len(images))
            if lines is not None:
                lines.update(len(images))
        bar.close()
        results = evaluator.evaluate()
    finally:
        bar.close()
        model.train(was_training)
    evaluate_s = time.perf_counter() - tick
    total = time.perf_counter() - start
    if main:
        (log or _stderr_line)(
            f"evaluation: {images_seen} images on rank 0 in {total:.2f} s "
            f"({images_seen / max(total, 1e-9):.1f} images/s); model {seconds['model']:.2f} s, "
            f"metric {seconds['process'] + evaluate_s:.2f} s (process {seconds['process']:.2f} s + "
            f"evaluate {evaluate_s:.2f} s), data loading {seconds['data']:.2f} s")
    return results


def build_val(cfg: dict, seed: int = 0):
    """(val dataset, val loader, evaluator) from ``data.val`` and ``evaluation``; None if absent."""
    data = cfg.get("data") or {}
    if data.get("val") is None or cfg.get("evaluation") is None:
        return None
    from ..data import build_dataloader, build_dataset
    from ..evaluation.build import build_evaluator
    from .setup import split_config

    split = split_config(data, "val")  # data.skip_bad_images applies to val as to train
    dataset = build_dataset(split, root=data.get("root"), path="data.val")
    loader = build_dataloader(split, dataset, train=False, seed=seed)
    evaluator = build_evaluator(cfg["evaluation"], dataset)
    return dataset, loader, evaluator


def evaluate_checkpoint(cfg: dict, checkpoint: str | os.PathLike, device: str | None = None) -> dict:
    """Evaluate the weights of ``checkpoint`` (EMA ones when present) on ``data.val``.

    Single process or under torchrun (call it on every rank). Returns the evaluator's dict.
    """
    from ..models import build_model
    from .architecture import describe_checkpoint
    from .checkpoint import inference_state_dict, load_checkpoint, load_model_weights

    built = build_val(cfg)
    if built is None:
        raise ValueError("config has no data.val or evaluation section to evaluate with")
    _, loader, evaluator = built
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg["model"]).to(dev)
    ckpt = load_checkpoint(checkpoint)
    load_model_weights(model, inference_state_dict(ckpt), source=str(Path(checkpoint)),
                       architecture=describe_checkpoint(ckpt))
    return inference_on_loader(model, loader, evaluator, dev)
