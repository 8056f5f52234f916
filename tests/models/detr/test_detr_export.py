"""The heads export to ONNX with the gather sampler (no GridSample node; dynamic batch and
feature sizes) and ONNX Runtime gives PyTorch's outputs, at the traced size and at others."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from detkit.models import HEADS
from detkit.structures import ShapeSpec

SHAPES = {"p3": ShapeSpec(16, 8), "p4": ShapeSpec(16, 16), "p5": ShapeSpec(16, 32)}


class _Outputs(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, p3, p4, p5):
        out = self.head({"p3": p3, "p4": p4, "p5": p5})
        return out["pred_logits"], out["pred_boxes"]


@pytest.mark.parametrize("kind,kw", [("RTDETRHead", {"num_levels": 4}),
                                     ("RTDETRHead", {"sampling_method": "discrete"}),
                                     ("DFINEHead", {"reg_max": 8, "num_points": [2, 4, 3]})])
def test_onnx_runtime_equals_pytorch(kind, kw, tmp_path):
    torch.manual_seed(0)
    head = HEADS.build({"type": kind, "hidden_dim": 32, "num_queries": 15, "num_decoder_layers": 2,
                        "num_heads": 4, "ffn_dim": 48, **kw}, "h", input_shapes=SHAPES, num_classes=3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    head.set_exportable(True)
    model = _Outputs(head).eval()
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 16, 12 // s, 20 // s, generator=g) for s in (1, 2, 4)]
    path = tmp_path / "head.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(feats), str(path), input_names=["p3", "p4", "p5"],
                          output_names=["logits", "boxes"], opset_version=17, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 2: f"h_{n}", 3: f"w_{n}"}
                                           for n in ("p3", "p4", "p5")},
                                        "logits": {0: "batch"}, "boxes": {0: "batch"}})
    assert "GridSample" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other_size = [torch.randn(1, 16, 14 // s, 24 // s, generator=g) for s in (1, 2, 4)]   # 14x24, 7x12, 3x6
    for batch in ([f * 1.3 for f in feats], [f[1:] for f in feats], other_size):
        with torch.no_grad():
            ref = model(*batch)
        out = session.run(None, {n: f.numpy() for n, f in zip(("p3", "p4", "p5"), batch)})
        for o, r in zip(out, ref):
            assert np.abs(o - r.numpy()).max() < 1e-4
