"""Run an exported detkit model with the OpenVINO runtime (CPU), the same call as ONNX Runtime.

OpenVINO reads the ``.onnx`` file or an IR ``.xml`` (its ONNX frontend handles ``NonMaxSuppression`` and
``RoiAlign``); dynamic axes stay dynamic. OpenVINO reads an input that has a default (the
detectors' optional ``image_sizes``, an initializer of the same name) as a constant, so the
default is removed from an in-memory copy first and the input is always fed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .onnx_runtime import read_export_info
from .ops import SIZES_DEFAULT

__all__ = ["OpenVINOModel"]


def _read_without_defaults(core, path: str | os.PathLike):
    """``core.read_model`` of the file with the initializers that shadow graph inputs removed
    (an OpenVINO IR ``.xml``, e.g. an INT8 model from ``tools/export.py --int8``, is read as is:
    it was written from such a copy)."""
    import tempfile

    import onnx

    if str(path).lower().endswith(".xml"):
        return core.read_model(str(path))

    proto = onnx.load(str(path))
    inputs = {i.name for i in proto.graph.input}
    defaults = [t for t in proto.graph.initializer if t.name in inputs]
    if not defaults:
        return core.read_model(str(path))
    for tensor in defaults:
        proto.graph.initializer.remove(tensor)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model.onnx"
        onnx.save(proto, str(copy))
        return core.read_model(str(copy))


class OpenVINOModel:
    """``OpenVINOModel(path)(images)`` -> outputs by name; see ``OnnxRuntimeModel``."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError:
            raise ValueError("backend 'openvino' needs the openvino package (pip install openvino)") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX or OpenVINO IR file")
        if str(device) != "cpu":
            raise ValueError(f"backend 'openvino' runs on the CPU here; got device '{device}'")
        # f32 by default: the CPU plugin may otherwise pick bf16 on CPUs that have it, changing the
        # scores; bf16 (opt-in: Predictor(..., amp=True)) about halves the FP32 time on AVX-512 BF16
        if precision not in ("f32", "bf16"):
            raise ValueError(f"OpenVINO precision must be f32 or bf16, got '{precision}'")
        config: dict = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(_read_without_defaults(core, path), "CPU", config)
        except RuntimeError as e:
            raise ValueError(f"{path}: OpenVINO cannot compile it: {e}") from None
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        # an input port may carry several tensor names (OpenVINO adds its consumer's): pick ours
        self.input_names = [next((n for n in ("images", "image_sizes") if n in i.get_names()),
                                 i.get_any_name()) for i in self.compiled.inputs]
        self.info = read_export_info(path)

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        feed = {self.input_names.index("images"): np.ascontiguousarray(images, np.float32)}
        if "image_sizes" in self.input_names:
            if image_sizes is None:   # the graph's default: the padded input size
                image_sizes = np.full((1, 2), SIZES_DEFAULT, np.int64)
            feed[self.input_names.index("image_sizes")] = np.ascontiguousarray(image_sizes, np.int64)
        result = self.request.infer(feed)
        return {name: np.asarray(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}

    def input_shape(self) -> list:
        shape = self.compiled.inputs[0].get_partial_shape()
        return [d.get_length() if d.is_static else "dynamic" for d in shape]
