"""Evaluate an exported model (``.onnx``, INT8 ``.onnx`` or an OpenVINO ``.xml``) on a config's
val split with the same loader, evaluator and mapping back as a checkpoint, so the accuracy of
what is deployed is measured, not assumed (``tools/eval.py CONFIG model.onnx``)."""

from __future__ import annotations

import os

import torch

__all__ = ["evaluate_exported", "ExportedEvalModel"]


class ExportedEvalModel:
    """A ``DeployedModel`` with the ``eval()`` / ``train()`` / ``training`` of an ``nn.Module``,
    which ``detkit.engine.inference_on_loader`` calls around its loop."""

    training = False

    def __init__(self, path: str | os.PathLike, *, backend: str = "onnxruntime",
                 threads: int | None = None, precision: str = "f32"):
        from .runtime import DeployedModel

        self.deployed = DeployedModel(path, backend=backend, threads=threads, precision=precision)

    def eval(self) -> "ExportedEvalModel":
        return self

    def train(self, mode: bool = True) -> "ExportedEvalModel":
        if mode:
            raise ValueError("an exported model cannot be trained")
        return self

    def __call__(self, images, targets=None):
        return self.deployed(images, targets)


def evaluate_exported(cfg: dict, path: str | os.PathLike, *, backend: str | None = None,
                      threads: int | None = None, precision: str = "f32") -> dict[str, float]:
    """The evaluator's metrics of the exported model ``path`` on ``cfg``'s ``data.val``.

    ``backend`` defaults to OpenVINO for ``.xml`` files and BF16, ONNX Runtime otherwise;
    ``precision="bf16"`` runs OpenVINO in BF16 (``DeployedModel``).
    """
    from ..engine.evaluate import build_val, inference_on_loader

    built = build_val(cfg)
    if built is None:
        raise ValueError("config has no data.val or evaluation section to evaluate with")
    _, loader, evaluator = built
    if backend is None:
        backend = "openvino" if str(path).lower().endswith(".xml") or precision == "bf16" else "onnxruntime"
    model = ExportedEvalModel(path, backend=backend, threads=threads, precision=precision)
    return inference_on_loader(model, loader, evaluator, torch.device("cpu"))  # type: ignore[arg-type]
