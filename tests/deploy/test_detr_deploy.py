"""A DETRDetector exported end to end (NMS-free top-K in the graph, gather sampler) gives the
PyTorch model's detections through ``Predictor``-style running: padded images, mixed batches."""

from __future__ import annotations

import pytest
import torch

from detkit.deploy.check import sample_images
from detkit.deploy.export import export_onnx
from detkit.deploy.runtime import DeployedModel
from detkit.models import build_model

pytest.importorskip("onnxruntime")

MODEL = {"type": "DETRDetector", "num_classes": 4,
         "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c3", "c4", "c5"],
                      "weights": None, "norm": "BN"},
         "neck": {"type": "FPN", "out_channels": 32},
         "head": {"type": "RTDETRHead", "hidden_dim": 32, "num_queries": 20, "num_decoder_layers": 2,
                  "num_heads": 4, "ffn_dim": 64, "num_top_queries": 30}}


@pytest.fixture(scope="module")
def detr():
    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    with torch.no_grad():       # spread-out scores: a fresh head scores every query alike
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model


def _equal(got: list[dict], ref: list[dict]) -> None:
    for g, r in zip(got, ref):
        assert torch.equal(g["labels"], r["labels"])
        torch.testing.assert_close(g["scores"], r["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["boxes"], r["boxes"], atol=0.5, rtol=0)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_detr_equals_pytorch_on_padded_and_mixed_batches(detr, tmp_path, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    path = tmp_path / "detr.onnx"
    export_onnx(detr, path, 128, 160, dynamic=True)
    deployed = DeployedModel(path, backend=backend)
    portrait = sample_images(1, 150, 100, seed=3)[0]
    landscape = sample_images(1, 90, 140, seed=4)[0]
    for images in ([portrait], [portrait, landscape]):
        with torch.no_grad():
            reference = detr(images)
        got = deployed(images)
        assert all(len(g["scores"]) == 30 for g in got)
        _equal(got, reference)
        # clipped at each image's own size, not the padded batch's
        for g, image in zip(got, images):
            assert float(g["boxes"][:, 2].max()) <= image.shape[-1] + 1e-4
            assert float(g["boxes"][:, 3].max()) <= image.shape[-2] + 1e-4


def test_detr_graph_has_no_grid_sample_and_no_nms(detr, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "detr.onnx"
    export_onnx(detr, path, 128, 128)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GridSample" not in ops and "NonMaxSuppression" not in ops
    # the caller's model keeps the grid_sample attention (export works on a copy)
    from detkit.models.detr.attention import MSDeformableAttention
    assert not any(getattr(m, "exportable", False) for m in detr.modules()
                   if isinstance(m, MSDeformableAttention))
