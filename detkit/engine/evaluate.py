"""Evaluation loop: every rank predicts its shard of the val loader; the evaluator gathers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["inference_on_loader", "build_val", "evaluate_checkpoint"]


def _to_cpu(pred: dict) -> dict:
    return {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in pred.items()}


@torch.no_grad()
def inference_on_loader(model: nn.Module, loader, evaluator, device: torch.device) -> dict[str, float]:
    """Run ``model`` (eval mode) over ``loader`` and return ``evaluator.evaluate()``.

    Must be called on every rank when training with DDP: the loader yields this rank's shard
    and the evaluator gathers all shards (it de-duplicates the images DistributedSampler pads).
    Predictions are mapped to original-image pixels by the model (targets carry the metas).
    """
    was_training = model.training
    model.eval()
    evaluator.reset()
    try:
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            predictions = model(images, targets)
            evaluator.process(targets, [_to_cpu(p) for p in predictions])
        return evaluator.evaluate()
    finally:
        model.train(was_training)


def build_val(cfg: dict, seed: int = 0):
    """(val dataset, val loader, evaluator) from ``data.val`` and ``evaluation``; None if absent."""
    data = cfg.get("data") or {}
    if data.get("val") is None or cfg.get("evaluation") is None:
        return None
    from ..data import build_dataloader, build_dataset
    from ..evaluation import build_evaluator

    dataset = build_dataset(data["val"], root=data.get("root"), path="data.val")
    loader = build_dataloader(data["val"], dataset, train=False, seed=seed)
    evaluator = build_evaluator(cfg["evaluation"], dataset)
    return dataset, loader, evaluator


def evaluate_checkpoint(cfg: dict, checkpoint: str | os.PathLike, device: str | None = None) -> dict:
    """Evaluate the weights of ``checkpoint`` (EMA ones when present) on ``data.val``.

    Single process or under torchrun (call it on every rank). Returns the evaluator's dict.
    """
    from ..models import build_model
    from .checkpoint import inference_state_dict, load_checkpoint, load_model_weights

    built = build_val(cfg)
    if built is None:
        raise ValueError("config has no data.val or evaluation section to evaluate with")
    _, loader, evaluator = built
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg["model"]).to(dev)
    load_model_weights(model, inference_state_dict(load_checkpoint(checkpoint)),
                       source=str(Path(checkpoint)))
    return inference_on_loader(model, loader, evaluator, dev)
