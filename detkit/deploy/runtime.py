"""An exported model behind the detector call of ``Predictor``: ``model(images, metas)``.

``DeployedModel`` takes what a detkit detector takes at inference (a list of Float[3,Hi,Wi]
images from the config's test pipeline and their metas), pads them into one batch exactly as
``Detector.preprocess`` does (bottom / right, to ``size_divisibility``, with the pixel mean so
the normalised padding is 0 as in PyTorch), feeds each image's unpadded size as the graph's
``image_sizes`` (clipping, size filters and CenterNet's peak mask then happen at it, as in
PyTorch), runs ONNX Runtime or OpenVINO, and maps the padded ``[B,K]`` outputs back per image
with the PyTorch path's own ``Detector.map_to_original`` (Mask R-CNN: ``paste_masks`` at the
model's ``mask_threshold``).

A segmentor's label map is the argmax of its logits (the graph's ``sem_seg_logits``) resized
to the original image bilinearly, as ``Segmentor.forward`` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import load_yaml
from ..errors import DetkitError
from ..models.detectors.base import IMAGENET_MEAN, Detector

__all__ = ["DeployedModel", "ExportedInputError", "is_exported", "default_backend", "BACKENDS"]

BACKENDS = ("pytorch", "onnxruntime", "openvino")


class ExportedInputError(DetkitError, ValueError):
    """Images that the exported file cannot take (a static input size other than the pipeline's)."""


def is_exported(checkpoint) -> bool:
    """True for an exported ``.onnx`` file or OpenVINO IR ``.xml`` (what the runtimes run), False
    for a checkpoint."""
    return checkpoint is not None and str(checkpoint).lower().endswith((".onnx", ".xml"))


def default_backend(checkpoint) -> str:
    """The runtime an exported file runs on when none is named: OpenVINO for an IR ``.xml``."""
    return "openvino" if str(checkpoint).lower().endswith(".xml") else "onnxruntime"


class DeployedModel:
    """Run an exported ``.onnx`` file like a detkit detector in eval mode.

    Args:
        path: the ``.onnx`` file (its ``.onnx.json`` metadata is read when present).
        backend: ``onnxruntime`` (default) or ``openvino``.
        device: ``cpu`` or ``cuda[:N]`` (onnxruntime's CUDA provider, CPU fallback with a warning).
        threads: intra-op threads of the runtime (None: its default).
        precision: ``f32`` (default: the checkpoint's numbers) or ``bf16`` (OpenVINO only: its
            ``INFERENCE_PRECISION_HINT``, on CPUs with BF16 instructions).
    """

    def __init__(self, path: str | os.PathLike, *, backend: str = "onnxruntime", device: str = "cpu",
                 threads: int | None = None, precision: str = "f32"):
        if backend == "onnxruntime":
            from .onnx_runtime import OnnxRuntimeModel as Runtime
        elif backend == "openvino":
            from .openvino_runtime import OpenVINOModel as Runtime  # type: ignore[assignment]
        else:
            raise ValueError(f"backend '{backend}' cannot run {path}: use one of "
                             f"{', '.join(BACKENDS[1:])} for an exported .onnx file")
        self.path = Path(path)
        if precision != "f32" and backend != "openvino":
            raise ValueError(f"{path}: precision '{precision}' needs the openvino backend "
                             f"(onnxruntime runs the graph's own precision)")
        extra = {"precision": precision} if backend == "openvino" else {}
        self.runtime = Runtime(path, device=str(device), threads=threads, **extra)
        info = self.runtime.info
        self.size_divisibility = int(info.get("input", {}).get("size_divisibility", 32))
        mean = info.get("input", {}).get("pixel_mean", list(IMAGENET_MEAN))
        self.pixel_mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        shape = self.runtime.input_shape()
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_hw = tuple(shape[2:]) if all(isinstance(d, int) for d in shape[2:]) else None
        self.mask_threshold = float(info.get("mask_threshold", 0.5))

    @property
    def info(self) -> dict:
        return self.runtime.info

    def stored_config(self) -> dict | None:
        """The resolved config stored at export (``None`` when the metadata has none)."""
        text = self.runtime.info.get("config")
        cfg = load_yaml(text) if isinstance(text, str) else None
        return cfg if isinstance(cfg, dict) else None

    def batch(self, images: Sequence[Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Float32[B,3,H,W] images padded bottom/right with the pixel mean to a common size, and
        Int64[B,2] their sizes before padding (the graph's ``image_sizes``)."""
        div = max(self.size_divisibility, 1)
        height = -(-max(int(im.shape[-2]) for im in images) // div) * div
        width = -(-max(int(im.shape[-1]) for im in images) // div) * div
        if self.fixed_hw is not None and (height, width) != self.fixed_hw:
            raise ExportedInputError(
                f"{self.path} was exported for {self.fixed_hw[0]}x{self.fixed_hw[1]} inputs, the "
                f"test pipeline gives {height}x{width} (padded): export again with --dynamic or "
                f"--size {height} {width}")
        out = self.pixel_mean.expand(len(images), 3, height, width).clone()
        for target, image in zip(out, images):
            target[:, : image.shape[-2], : image.shape[-1]] = image.float().cpu()
        sizes = np.array([[int(im.shape[-2]), int(im.shape[-1])] for im in images], np.int64)
        return out.numpy(), sizes

    def run(self, images: Sequence[Tensor]) -> dict[str, np.ndarray]:
        """Outputs of one batch; a model exported with a fixed batch size B0 runs in chunks of B0."""
        step = self.fixed_batch or len(images)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(images), step):
            chunk = list(images[start:start + step])
            count = len(chunk)
            chunk += [chunk[-1]] * (step - count)          # fill a fixed batch with repeats
            outputs = self.runtime(*self.batch(chunk))
            parts.append({k: v[:count] for k, v in outputs.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __call__(self, images: Sequence[Tensor], metas: Sequence[dict] | None = None) -> list[dict]:
        """Per image ``boxes`` / ``scores`` / ``labels`` (or ``sem_seg``), in original pixels
        when ``metas`` are given (as ``Detector.forward`` with targets)."""
        outputs = self.run(images)
        results = []
        for i, image in enumerate(images):
            h, w = int(image.shape[-2]), int(image.shape[-1])
            if "sem_seg" in outputs:
                results.append({"sem_seg": self._label_map(outputs, i, h, w, metas)})
                continue
            n = int(outputs["num_detections"][i])
            # already clipped in the graph, at the image_sizes fed by run()
            boxes = torch.from_numpy(outputs["boxes"][i, :n]).float()
            result = {"boxes": boxes, "scores": torch.from_numpy(outputs["scores"][i, :n]).float(),
                      "labels": torch.from_numpy(outputs["labels"][i, :n]).long()}
            result = Detector.map_to_original(result, metas[i]) if metas is not None else result
            if "mask_probs" in outputs:   # Mask R-CNN: paste at the final boxes, as the PyTorch path
                from ..models.mask_paste import paste_masks

                orig = metas[i].get("orig_size") if metas is not None else None
                size = (int(orig[0]), int(orig[1])) if orig is not None else (h, w)
                probs = torch.from_numpy(outputs["mask_probs"][i, :n]).float()
                result["masks"] = paste_masks(probs, result["boxes"], size, threshold=self.mask_threshold)
            results.append(result)
        return results

    @staticmethod
    def _label_map(outputs: dict[str, np.ndarray], i: int, h: int, w: int,
                   metas: Sequence[dict] | None) -> Tensor:
        """Int64 label map of image i: its logits (padding cut off) mapped to the original image
        bilinearly, then the argmax, as ``Segmentor.forward``; files without logits: the graph's
        label map, resized by nearest neighbour."""
        if "sem_seg_logits" in outputs:
            from ..models.detectors.segmentor import logits_to_original

            logits = torch.from_numpy(outputs["sem_seg_logits"][i, :, :h, :w]).float()
            return (logits_to_original(logits, metas[i]) if metas is not None else logits).argmax(0)
        label_map = torch.from_numpy(outputs["sem_seg"][i, :h, :w])
        if metas is None:
            return label_map
        from ..evaluation.segmentation import sem_seg_to_original

        return sem_seg_to_original(label_map, metas[i])

    def __repr__(self) -> str:
        return f"DeployedModel({self.path.name}, {self.runtime.name})"
