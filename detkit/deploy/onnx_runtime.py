"""Run an exported detkit model with ONNX Runtime (no PyTorch model is built).

``OnnxRuntimeModel(path)(images, image_sizes)`` takes Float32[B,3,H,W] RGB in [0,1] (numpy) and,
optionally, Int64[B,2] unpadded (H, W) per image, and returns the graph's outputs by name (see
``detkit.deploy.export``). ``device="cuda"`` uses ONNX Runtime's
``CUDAExecutionProvider`` when this onnxruntime build has it, else the CPU with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["OnnxRuntimeModel", "read_export_info"]


def read_export_info(path: str | os.PathLike) -> dict:
    """The ``<model>.onnx.json`` written at export (empty dict when absent)."""
    meta = Path(f"{path}.json")
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta}: not valid JSON ({e})") from None


def _graph_inputs(path: str | os.PathLike) -> list:
    """The graph inputs of an ONNX file (``ValueInfoProto``), including those with a default."""
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.input)


class OnnxRuntimeModel:
    """An ``onnxruntime.InferenceSession`` on an exported detkit model.

    Args:
        path: the ``.onnx`` file. device: ``cpu`` or ``cuda[:N]``.
        threads: intra-op threads (None: onnxruntime's default, all cores).
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        providers: list = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                index = int(str(device).split(":")[1]) if ":" in str(device) else 0
                providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            else:
                warnings.warn(f"device '{device}': this onnxruntime has no CUDAExecutionProvider "
                              f"(install onnxruntime-gpu); running on the CPU", stacklevel=2)
        options = ort.SessionOptions()
        # 3 = errors only: the optional image_sizes input is an initializer that is also a graph
        # input, which onnxruntime reports at warning level on every load although it is meant
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"{path}: onnxruntime cannot load it: {e}") from None
        self.input_name = self.session.get_inputs()[0].name
        # get_inputs() leaves out inputs that have a default (an initializer), so read the file's
        self.input_names = [i.name for i in _graph_inputs(path)]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.info = read_export_info(path)

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``image_sizes`` Int64[B,2] is fed when the graph has that input (detectors)."""
        feed = {self.input_name: np.ascontiguousarray(images, np.float32)}
        if image_sizes is not None and "image_sizes" in self.input_names:
            feed["image_sizes"] = np.ascontiguousarray(image_sizes, np.int64)
        outputs = self.session.run(None, feed)
        return dict(zip(self.output_names, outputs))

    def input_shape(self) -> list:
        """[B, 3, H, W] with strings for dynamic axes."""
        return list(self.session.get_inputs()[0].shape)
