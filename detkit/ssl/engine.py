"""Pre-training on the detection engine: the :class:`~detkit.engine.Trainer` with a method as model.

Everything the trainer does (torchrun DDP, AMP, accumulation, exact resume, metrics.jsonl,
TensorBoard, progress bar) applies unchanged; the method's momentum updates run through the
trainer's ``after_optimizer_step`` hook, and the checkpoint's ``meta.ssl`` records which part
of the model is the backbone to fine-tune from (read by ``model.backbone.weights``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..engine.trainer import Trainer
from .base import SSLMethod, build_method

__all__ = ["PretrainTrainer", "pretrain"]


class PretrainTrainer(Trainer):
    """A Trainer whose ``model`` section names a self-supervised method (``SSL_METHODS``)."""

    def build_model(self, cfg: dict) -> nn.Module:
        return build_method(cfg, "model")

    def summary_forward(self):
        """The summary's GFLOPs: the transferred backbone on one global view (the method's
        forward has side effects: queues, centres)."""
        method = self.model
        assert isinstance(method, SSLMethod)
        view = method._normalise(self.train_set[0][0][:1].to(self.device))   # Float[1,3,S,S]
        backbone = method.exported_backbone()
        return (lambda: backbone(view)), tuple(view.shape[1:]), f"the {method.backbone_type} backbone"

    def state_dict(self) -> dict:
        state = super().state_dict()
        method = self.model
        assert isinstance(method, SSLMethod)
        state["meta"]["ssl"] = method.checkpoint_meta()
        return state


def pretrain(cfg: dict, work_dir: str | Path, resume: bool | str | Path = False,
             deterministic: bool = False, stop_after: int | None = None) -> None:
    """Build a :class:`PretrainTrainer` from a resolved config and run it (see ``engine.train``)."""
    PretrainTrainer(cfg, work_dir, resume=resume, deterministic=deterministic).train(stop_after)
