"""End-to-end exportable detectors and the ONNX export itself.

``exportable(model)`` wraps a detkit detector in a module whose ``forward(images, image_sizes)``
takes ``images`` Float[B,3,H,W] RGB in [0,1] (H, W multiples of ``size_divisibility``, padded
bottom / right) and ``image_sizes`` Int64[B,2] (or [1,2] for all images), each image's (H, W)
before padding, and returns the whole inference, decode and NMS included; boxes are clipped,
size-filtered and CenterNet peaks masked at ``image_sizes``, as ``model(images)`` does (legend:
``detkit.deploy.postprocess``). In the ONNX file ``image_sizes`` is optional: not fed, it is
the padded input size (an initializer holding 2^31 - 1, capped at the input). A segmentor's
graph has the one input ``images``. Outputs:

* detectors: ``boxes`` Float[B,K,4] xyxy input pixels, ``scores`` Float[B,K], ``labels``
  Int64[B,K] (-1 on padding rows), ``num_detections`` Int64[B];
* segmentors: ``sem_seg`` Int64[B,H,W] and ``sem_seg_logits`` Float[B,C,H,W] (``DeployedModel``
  resizes the logits to the original image before the argmax, as the PyTorch path does);
* Mask R-CNN adds ``mask_probs`` Float[B,K,28,28]: each detection's mask probabilities (of its
  class) over its box, to paste with ``detkit.models.mask_paste.paste_masks`` at the boxes once
  they are mapped to the original image (as ``DeployedModel`` does).

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The dynamo exporter
needs every data-dependent size (NMS output, score threshold) declared as an unbacked symbol with
hints and has no ``NonMaxSuppression`` / ``RoiAlign`` translation for a custom autograd function,
while the TorchScript tracer keeps those sizes symbolic, exports torchvision's ``roi_align`` /
``roi_pool`` to ONNX ``RoiAlign`` / ``MaxRoiPool`` and lets :class:`~detkit.deploy.ops.GroupedNMS`
emit ``NonMaxSuppression``.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .ops import SIZES_DEFAULT, image_hw, unpadded_sizes
from .postprocess import OUTPUT_NAMES, detr_outputs, finalize, one_stage_candidates
from .two_stage import mask_probabilities, roi_head_candidates, rpn_proposals

__all__ = ["ExportError", "exportable", "export_onnx", "check_exportable", "fixed_size_layer",
           "SEG_OUTPUT_NAMES"]

SEG_OUTPUT_NAMES = ("sem_seg", "sem_seg_logits")


class ExportError(ValueError):
    """A model (or a part of it) that cannot be exported; the message names it and the way out."""


class _Exportable(nn.Module):
    """Normalisation + features of a detkit detector (shared by every family wrapper)."""

    output_names: tuple[str, ...] = OUTPUT_NAMES

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model: Any = model      # a detkit detector; its parts are read by duck typing

    def features(self, images: Tensor) -> dict[str, Tensor]:
        m = self.model
        return m.features(_Batch((images - m.pixel_mean) / m.pixel_std))


class _Batch:
    """The one attribute of ``ImageList`` that ``Detector.features`` reads."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class OneStageExport(_Exportable):
    """OneStageDetector (YOLOv3, YOLOv1, CenterNet; CenterNet's ``flip_test`` included)."""

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        m, sizes, n = self.model, unpadded_sizes(images, image_sizes), images.shape[0]
        if m.flip_test:
            outputs = m.head(self.features(torch.cat([images, images.flip(-1)])))
            outputs = m.head.merge_flip({k: v[:n] for k, v in outputs.items()},
                                        {k: v[n:] for k, v in outputs.items()})
        else:
            outputs = m.head(self.features(images))
        return finalize(one_stage_candidates(m.head, outputs, sizes), m.head.num_classes, n)


class TwoStageExport(_Exportable):
    """TwoStageDetector: RPN -> RoIHead (RoIAlign / SPP pooling) or RFCNHead [-> MaskRoIHead:
    a fifth output ``mask_probs`` Float[B,K,M,M], pasted at the boxes outside the graph]."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(model, "mask_head", None) is not None:
            self.output_names = OUTPUT_NAMES + ("mask_probs",)

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        m, hw, n = self.model, image_hw(images), images.shape[0]
        sizes = unpadded_sizes(images, image_sizes)
        features = self.features(images)
        proposals, ok = rpn_proposals(m.rpn, features, sizes, n)
        outputs = roi_head_candidates(m.roi_head, features, proposals, ok, hw, sizes, n)
        if getattr(m, "mask_head", None) is None:
            return outputs
        return (*outputs, mask_probabilities(m.mask_head, features, outputs[0], outputs[2], hw))


class DETRExport(_Exportable):
    """DETRDetector (RT-DETR, D-FINE): NMS-free; the attention samples with the gather form
    (no ``GridSample``, which TensorRT mis-computes in such graphs), then the top-K sigmoid
    scores over queries x classes, boxes clipped at each image's unpadded size."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.model.head.set_exportable(True)

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        m = self.model
        outputs = m.head(self.features(images))
        return detr_outputs(outputs["pred_logits"], outputs["pred_boxes"], image_hw(images),
                            unpadded_sizes(images, image_sizes), m.head.num_top_queries)


class SegmentorExport(_Exportable):
    """Segmentor: per-pixel argmax of the upsampled logits, and the logits Float[B,C,H,W]
    themselves, which a runtime resizes to the original image before the argmax, as PyTorch."""

    output_names = SEG_OUTPUT_NAMES

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model.head.upsample(self.model.head(self.features(images)))
        return logits.argmax(dim=1), logits


def fixed_size_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first (name, module) whose graph is fixed to the traced input size
    (``fixed_export_size``: the ViT), or None when height and width can be dynamic."""
    return next(((n, m) for n, m in model.named_modules() if getattr(m, "fixed_export_size", False)),
                None)


def check_exportable(model: nn.Module, opset: int, dynamic: bool = False) -> None:
    """Raise ExportError for layers without an ONNX form (deformable convs), for settings the
    graph cannot reproduce (generic test-time augmentation) and for a dynamic height / width
    through a module whose graph is fixed to the traced size (``fixed_export_size``: the ViT)."""
    from torchvision.ops import DeformConv2d

    from ..models.layers.deform_conv import DeformConvBlock

    fixed = fixed_size_layer(model) if dynamic else None
    if fixed is not None:
        div = int(getattr(model, "size_divisibility", 1) or 1)
        raise ExportError(
            f"--dynamic: layer '{fixed[0] or 'model'}' ({type(fixed[1]).__name__}) is exported for "
            f"one input size (its position embeddings and window grid are computed when the graph "
            f"is traced), so height and width cannot be dynamic. Export without --dynamic at the "
            f"size the config's test pipeline gives (e.g. its square resize): --size H W with "
            f"H and W multiples of {div}")
    for name, module in model.named_modules():
        if isinstance(module, (DeformConvBlock, DeformConv2d)):
            raise ExportError(
                f"layer '{name}' ({type(module).__name__}) is a deformable convolution: torchvision "
                f"has no ONNX export for it (ONNX DeformConv exists from opset 19 only, you asked "
                f"for {opset}, and onnxruntime's CPU provider does not implement it). Export a "
                f"config without DCN (e.g. drop backbone.dcn_stages / neck.deformable).")
    from ..models.heads.rfcn_head import RFCNHead

    roi_head = getattr(model, "roi_head", None)
    if isinstance(roi_head, RFCNHead) and roi_head.align and opset < 16:
        # ONNX RoiAlign gained coordinate_transformation_mode="half_pixel" (aligned=True) in
        # opset 16; torchvision's older form drops the half-pixel shift with only a warning
        raise ExportError(f"R-FCN with PS-RoIAlign (roi_head.align: true) needs --opset 16 or "
                          f"newer (you asked for {opset}): ONNX RoiAlign before opset 16 has no "
                          f"half-pixel mode, and every box would be wrong")
    if getattr(model, "test_time_aug", None) is not None:
        raise ExportError("model.test_time_aug is not part of an exported graph; export with "
                          "--set model.test_time_aug=null")


def exportable(model: nn.Module) -> _Exportable:
    """The family wrapper of a detkit model (used as is, so pass a copy in eval mode)."""
    from ..models.detectors.detr import DETRDetector
    from ..models.detectors.one_stage import OneStageDetector
    from ..models.detectors.segmentor import Segmentor
    from ..models.detectors.two_stage import TwoStageDetector

    for cls, wrapper in ((OneStageDetector, OneStageExport), (TwoStageDetector, TwoStageExport),
                         (Segmentor, SegmentorExport), (DETRDetector, DETRExport)):
        if isinstance(model, cls):
            return wrapper(model)
    raise ExportError(f"{type(model).__name__}: no exportable form (detkit exports "
                      f"OneStageDetector, TwoStageDetector, DETRDetector and Segmentor)")


def export_onnx(model: nn.Module, out: str | Path, height: int, width: int, *, batch: int = 1,
                opset: int = 17, dynamic: bool = False, class_names: list[str] | None = None,
                label_to_cat_id: list[int] | None = None, config_text: str | None = None) -> dict:
    """Export ``model`` end to end to ``out`` and write ``<out>.json``; returns that metadata.

    ``class_names``, ``label_to_cat_id`` (the dataset's category id of each label, as checkpoints
    carry it) and ``config_text`` (the resolved YAML config) go into the metadata, so that a
    runtime can pre-process, name classes and write dataset ids without the original files.
    The caller's model is not touched (mode, device and weights): a CPU copy in eval mode is
    traced. Raises ExportError (a clear message) for what cannot be exported.
    """
    div = int(getattr(model, "size_divisibility", 1) or 1)
    if height % div or width % div:
        raise ExportError(f"--size {height} {width}: must be multiples of the model's "
                          f"size_divisibility ({div})")
    check_exportable(model, opset, dynamic)
    wrapper = exportable(copy.deepcopy(model).cpu().eval())
    names = list(wrapper.output_names)
    example = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    segmentor = names == list(SEG_OUTPUT_NAMES)
    inputs = ["images"] if segmentor else ["images", "image_sizes"]
    args: tuple = (example,) if segmentor else (example, torch.tensor([[height, width]] * batch))
    # image_sizes: one row per image or a single row for all, whatever the batch axis
    axes: dict = {} if segmentor else {"image_sizes": {0: "image_sizes_rows"}}
    if dynamic:
        axes["images"] = {0: "batch", 2: "height", 3: "width"}
        axes.update({n: {0: "batch"} for n in names})
        if segmentor:
            axes["sem_seg"] = {0: "batch", 1: "height", 2: "width"}
            axes["sem_seg_logits"] = {0: "batch", 2: "height", 3: "width"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # tracer warnings are about trace-time constants (strides, k); every other warning of the
        # exporter (e.g. an operator exported in a lossy legacy form) stays visible
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # detkit indexes with non-negative indices only (the case this warning is about)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(wrapper, args, str(out), input_names=inputs, output_names=names,
                          opset_version=opset, dynamic_axes=axes or None, dynamo=False)
    if not segmentor:
        _give_default(out, "image_sizes", np.full((1, 2), SIZES_DEFAULT, np.int64))
    mean: Tensor = model.pixel_mean  # type: ignore[assignment]
    info = {"input": {"name": "images", "shape": ["batch" if dynamic else batch, 3,
                                                  "height" if dynamic else height,
                                                  "width" if dynamic else width],
                      "format": "RGB float in [0,1], NCHW; normalisation is inside the graph",
                      "size_divisibility": div, "pixel_mean": mean.flatten().tolist()},
            "inputs": inputs, "outputs": names, "class_names": list(class_names or []),
            "detector": type(model).__name__, "dynamic": bool(dynamic), "opset": int(opset)}
    if label_to_cat_id:
        info["label_to_cat_id"] = [int(c) for c in label_to_cat_id]
    mask_head = getattr(model, "mask_head", None)
    if mask_head is not None:
        info["mask_threshold"] = float(mask_head.mask_threshold)
    if config_text is not None:
        info["config"] = config_text
    Path(f"{out}.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def _give_default(path: Path, name: str, value: np.ndarray) -> None:
    """Make graph input ``name`` optional: an initializer of the same name is its value when the
    caller does not feed it (ONNX IR >= 4; onnxruntime honours it, OpenVINO reads it as a constant,
    so ``detkit.deploy.openvino_runtime`` removes it again to feed the input)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    proto.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.save(proto, str(path))
