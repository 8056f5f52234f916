"""Run an exported detkit model with the OpenVINO runtime (CPU), the same call as ONNX Runtime.

OpenVINO reads the ``.onnx`` file directly (its ONNX frontend handles ``NonMaxSuppression`` and
``RoiAlign``); dynamic axes stay dynamic.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .onnx_runtime import read_export_info

__all__ = ["OpenVINOModel"]


class OpenVINOModel:
    """``OpenVINOModel(path)(images)`` -> outputs by name; see ``OnnxRuntimeModel``."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ValueError("backend 'openvino' needs the openvino package (pip install openvino)") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        if str(device) != "cpu":
            raise ValueError(f"backend 'openvino' runs on the CPU here; got device '{device}'")
        # f32: the CPU plugin may otherwise pick bf16 on CPUs that have it, changing the scores
        config: dict = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as e:
            raise ValueError(f"{path}: OpenVINO cannot compile it: {e}") from None
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.info = read_export_info(path)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({0: np.ascontiguousarray(images, np.float32)})
        return {name: np.asarray(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}

    def input_shape(self) -> list:
        shape = self.compiled.inputs[0].get_partial_shape()
        return [d.get_length() if d.is_static else "dynamic" for d in shape]
