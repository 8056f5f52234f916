"""INT8 post-training static quantization of exported detkit models (ONNX Runtime QDQ, OpenVINO NNCF).

What is quantized: the convolutions and matrix products of backbone, neck and head (``Conv``,
``Gemm``, ``MatMul``), weights per output channel and symmetric (int8), activations calibrated on
real images. Decoding, top-k, NMS and RoI pooling stay in float: they are no such ops.

Kept in float by rule (:func:`float_layers`), since they lose the most accuracy when quantized:

* the first convolution (its input is the image, whose fine colour steps carry the signal);
* every prediction layer: a quantizable node from which no other quantizable node can be reached
  along the feature path (the walk does not cross ``TopK``, ``NonMaxSuppression``, ``NonZero``,
  ``Shape`` / ``Size``, the box and batch-index inputs of ``RoiAlign`` / ``MaxRoiPool`` or the
  index input of ``Gather*`` / ``Scatter*``, where the graph turns predictions into selections,
  sizes and positions, not features: the RPN's deltas only decide which FPN level pools each
  RoI and where its row goes), e.g. YOLO's 1x1 output convs, CenterNet's heatmap / size /
  offset convs, the RPN's objectness / delta convs and the RoI head's class and box layers;
* nodes whose names match one of ``skip`` (``--int8-skip``, fnmatch patterns).

OpenVINO (NNCF) quantizes only the convolution and matrix-product ops (every other op type of
the IR is in NNCF's ignored scope, see :func:`_openvino_float_scope`), as ONNX Runtime does.
NNCF would otherwise also put quantizers on the inputs of element-wise ops and propagate them
through RoI pooling: on Faster R-CNN it quantized the RoI areas before the ``Sqrt`` of the FPN
level rule and each level's ``RoiAlign`` output with a range of [0, 8e-5] (its statistics for
those dynamically-sized tensors were empty), sending every RoI to the finest level or zeroing
its pooled features: -0.064 AP.

Calibration: images through the config's test pipeline (``data.val.pipeline``), padded as
``DeployedModel`` pads them, fed to every input of the graph (``images`` and, when the graph has
it, ``image_sizes``).
"""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DetkitError

__all__ = ["QuantizationError", "float_layers", "calibration_images", "CalibrationSet",
           "quantize_onnx", "quantize_openvino", "quantize_export", "QUANTIZED_OPS",
           "OV_QUANTIZED_TYPES", "IMAGE_SUFFIXES"]

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
# the walk stops here: selections (TopK / NMS / NonZero) and a tensor's shape are no features
_STOP_OPS = {"TopK", "NonMaxSuppression", "NonZero", "Shape", "Size"}
# inputs that say where to read or write (boxes, batch and element indices), not features
_INDEX_INPUTS = {"RoiAlign": (1, 2), "MaxRoiPool": (1,), "Gather": (1,), "GatherElements": (1,),
                 "GatherND": (1,), "ScatterElements": (1,), "ScatterND": (1,)}
# the OpenVINO op types of QUANTIZED_OPS: the only ones NNCF may quantize (see quantize_openvino)
OV_QUANTIZED_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData",
                      "GroupConvolutionBackpropData", "MatMul")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class QuantizationError(DetkitError, ValueError):
    """Bad calibration input or a model that cannot be quantized; the message names it."""


def float_layers(model_proto, skip: Sequence[str] = ()) -> list[str]:
    """Names of the quantizable nodes that stay float (the module docstring's rule)."""
    graph = model_proto.graph
    consumers: dict[str, list[tuple[object, int]]] = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers[name].append((node, index))
    compute = [n for n in graph.node if n.op_type in QUANTIZED_OPS]
    keep: set[str] = set()
    if compute:
        keep.add(compute[0].name)
    for node in compute:
        if not _reaches_compute(node, consumers):
            keep.add(node.name)
    for node in compute:
        if any(fnmatch.fnmatchcase(node.name, pattern) for pattern in skip):
            keep.add(node.name)
    return [n.name for n in compute if n.name in keep]


def _reaches_compute(start, consumers) -> bool:
    seen: set[int] = set()
    stack = list(start.output)
    while stack:
        tensor = stack.pop()
        for node, index in consumers.get(tensor, ()):
            if node.op_type in _STOP_OPS or index in _INDEX_INPUTS.get(node.op_type, ()):
                continue
            if node.op_type in QUANTIZED_OPS:
                return True
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.output)
    return False


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise QuantizationError(f"--calib {folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QuantizationError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    return files


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when fewer)."""
    if count >= total:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, count)})


def calibration_images(cfg: dict, *, folder: str | os.PathLike | None = None,
                       split: str | None = None, count: int = 300) -> Iterator[np.ndarray]:
    """Up to ``count`` HxWx3 uint8 RGB images from a folder or from a split of the config's data
    (``train``, ``val``), spread evenly over it; an unreadable image is a QuantizationError."""
    from ..data.io import read_image

    if (folder is None) == (split is None):
        raise QuantizationError("calibration: give exactly one of --calib DIR or --calib-split SPLIT")
    if count < 1:
        raise QuantizationError(f"--calib-images must be >= 1, got {count}")
    if folder is not None:
        files = _image_files(Path(folder))
        for i in _spread(count, len(files)):
            try:
                yield read_image(files[i])
            except DetkitError as e:
                raise QuantizationError(f"calibration image {files[i]}: {e}") from None
        return
    from ..config import get_path
    from ..data.builder import build_dataset_node

    node = get_path(cfg, f"data.{split}.dataset", None)
    if node is None:
        raise QuantizationError(f"--calib-split {split}: the config has no data.{split}.dataset")
    dataset = build_dataset_node(node, f"data.{split}.dataset", root=get_path(cfg, "data.root", None))
    sources = _record_sources(dataset)
    if sources is None:
        raise QuantizationError(f"--calib-split {split}: {type(dataset).__name__} has no image "
                                f"records to calibrate on; use --calib DIR")
    if not sources:
        raise QuantizationError(f"--calib-split {split}: the dataset is empty")
    for i in _spread(count, len(sources)):
        reader, record = sources[i]
        yield reader.read(record)


def _record_sources(dataset, depth: int = 0) -> list[tuple] | None:
    """``(dataset, record)`` for every image under ``dataset``, through sample wrappers (Mosaic,
    MixUp: ``.dataset``; a subset gives its whole parent) and concatenations (``.datasets``); None
    if it has no records."""
    if "records" in vars(dataset):
        return [(dataset, r) for r in dataset.records]
    parts = vars(dataset).get("datasets") or [vars(dataset).get("dataset")]
    found = [f for d in parts if d is not None and depth < 8
             if (f := _record_sources(d, depth + 1)) is not None]
    return [pair for f in found for pair in f] if found else None


class CalibrationSet:
    """Feeds of the graph's inputs for each calibration image (batch 1, or the export's fixed
    batch filled with repeats): test pipeline, then bottom/right padding with the pixel mean."""

    def __init__(self, cfg: dict, images: Iterator[np.ndarray], *, input_shape: Sequence,
                 input_names: Sequence[str], pixel_mean: Sequence[float], size_divisibility: int):
        from ..inference import InferencePipeline

        self.pipeline = InferencePipeline(cfg)
        self.images = list(images)       # uint8 images; the float feeds are made per pass
        self.shape = list(input_shape)
        self.names = list(input_names)
        self.mean = np.asarray(pixel_mean, np.float32).reshape(3, 1, 1)
        self.div = max(int(size_divisibility), 1)

    def _pad(self, tensor: np.ndarray) -> np.ndarray:
        h, w = tensor.shape[-2:]
        fixed = [d if isinstance(d, int) else None for d in self.shape[2:]]
        out_h = fixed[0] or -(-h // self.div) * self.div
        out_w = fixed[1] or -(-w // self.div) * self.div
        if h > out_h or w > out_w:
            raise QuantizationError(f"calibration: the test pipeline gives {h}x{w} images but the "
                                    f"model was exported for {out_h}x{out_w}: export with a "
                                    f"matching --size or --dynamic")
        out = np.broadcast_to(self.mean, (3, out_h, out_w)).copy()
        out[:, :h, :w] = tensor
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        batch = self.shape[0] if isinstance(self.shape[0], int) else 1
        for image in self.images:
            tensor, _ = self.pipeline(image)
            array = tensor.numpy()
            padded = self._pad(array)
            feed = {self.names[0]: np.repeat(padded[None], batch, axis=0)}
            if "image_sizes" in self.names:
                feed["image_sizes"] = np.tile(np.asarray([array.shape[-2:]], np.int64), (batch, 1))
            yield feed


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, calibration: CalibrationSet, *,
                  skip: Sequence[str] = (), method: str = "minmax") -> list[str]:
    """ONNX Runtime QDQ static quantization of ``src`` into ``dst``; returns the float layers."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise QuantizationError(f"calibration method {method!r}: use one of {', '.join(methods)}")
    if not calibration.images:
        raise QuantizationError("calibration: no images")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration)

        def get_next(self):
            return next(self.it, None)

    prepared = Path(dst).with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        keep = float_layers(model, skip)
        quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                        nodes_to_exclude=keep, calibrate_method=methods[method],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    finally:
        prepared.unlink(missing_ok=True)
    return keep


def quantize_openvino(src: str | os.PathLike, dst: str | os.PathLike, calibration: CalibrationSet,
                      *, skip: Sequence[str] = (), subset_size: int = 300) -> list[str]:
    """NNCF post-training quantization of the ONNX file ``src`` into an OpenVINO IR ``dst``
    (``.xml`` + ``.bin``); the same float-layer rule, matched by ONNX node name."""
    try:
        import nncf  # type: ignore[import-untyped]
        import onnx
        import openvino as ov
    except ImportError:
        raise QuantizationError("--backend openvino needs nncf and openvino "
                                "(pip install 'detkit[deploy]')") from None
    keep = float_layers(onnx.load(str(src)), skip)
    if not calibration.images:
        raise QuantizationError("calibration: no images")
    from .openvino_runtime import _read_without_defaults

    model = _read_without_defaults(ov.Core(), src)   # keeps image_sizes an input
    batch = model.inputs[0].get_partial_shape()[0]
    if batch.is_static and len(model.inputs) > 1:
        # NNCF's statistics pass mis-infers the dynamic [?, 2] sizes next to a static batch
        model.reshape({model.inputs[1].get_any_name(): [batch.get_length(), 2]})
    float_names, float_types = _openvino_float_scope(model, keep)
    quantized = nncf.quantize(model, nncf.Dataset(calibration),
                              subset_size=min(subset_size, len(calibration.images)),
                              ignored_scope=nncf.IgnoredScope(names=float_names, types=float_types,
                                                              validate=False),
                              preset=nncf.QuantizationPreset.PERFORMANCE)
    ov.save_model(quantized, str(dst))
    return keep


def _openvino_float_scope(model, keep: Sequence[str]) -> tuple[list[str], list[str]]:
    """(op names, op types) of the OpenVINO model ``model`` that NNCF must leave float: every op
    type but OV_QUANTIZED_TYPES, and the ops of those types made from the ONNX nodes ``keep``.

    OpenVINO's ONNX reader names a ``Conv`` / ``Gemm`` with a bias ``<onnx name>/WithoutBiases``
    and gives the ONNX name to the bias ``Add``: matching names exactly would keep the ``Add``
    float and quantize the layer itself."""
    ops = list(model.get_ops())
    float_types = sorted({op.get_type_name() for op in ops} - set(OV_QUANTIZED_TYPES))
    kept = set(keep)
    names = [op.get_friendly_name() for op in ops if op.get_type_name() in OV_QUANTIZED_TYPES
             and (op.get_friendly_name() in kept
                  or op.get_friendly_name().rsplit("/", 1)[0] in kept)]
    return names, float_types


def quantize_export(cfg: dict, fp32: str | os.PathLike, out: str | os.PathLike, *,
                    backend: str = "onnxruntime", folder: str | os.PathLike | None = None,
                    split: str | None = None, count: int = 300, skip: Sequence[str] = (),
                    method: str = "minmax") -> dict:
    """Quantize the FP32 export ``fp32`` into ``out`` (``.onnx`` for ONNX Runtime, ``.xml`` for
    OpenVINO) and write ``<out>.json``: the FP32 metadata plus a ``quantization`` record.
    Returns that metadata."""
    import json

    import onnxruntime as ort

    if backend not in ("onnxruntime", "openvino"):
        raise QuantizationError(f"--backend {backend!r}: use onnxruntime or openvino")
    suffix = ".xml" if backend == "openvino" else ".onnx"
    if not str(out).lower().endswith(suffix):
        raise QuantizationError(f"--out {out}: an INT8 model for {backend} is a {suffix} file")
    info = json.loads(Path(f"{fp32}.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    calibration = CalibrationSet(
        cfg, calibration_images(cfg, folder=folder, split=split, count=count),
        input_shape=session.get_inputs()[0].shape, input_names=[i.name for i in session.get_inputs()],
        pixel_mean=info["input"].get("pixel_mean", [0.485, 0.456, 0.406]),
        size_divisibility=int(info["input"].get("size_divisibility", 32)))
    if backend == "openvino":
        kept = quantize_openvino(fp32, out, calibration, skip=skip, subset_size=count)
    else:
        kept = quantize_onnx(fp32, out, calibration, skip=skip, method=method)
    info["quantization"] = {"dtype": "int8", "backend": backend, "calibration_images":
                            len(calibration.images), "source": str(folder or f"data.{split}"),
                            "method": "nncf" if backend == "openvino" else method,
                            "float_layers": kept}
    Path(f"{out}.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info
