"""Deployment: end-to-end ONNX export (decode + NMS in the graph) and runtimes that run it.

* :func:`detkit.deploy.export.export_onnx` - export a detector / segmentor end to end;
* :class:`detkit.deploy.onnx_runtime.OnnxRuntimeModel`, :class:`detkit.deploy.openvino_runtime.OpenVINOModel`
  - run the exported file without PyTorch (``Predictor(config, "model.onnx")`` uses them).
"""
