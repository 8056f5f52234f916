"""tools/export.py: ONNX export of a tiny CenterNet, checked with onnxruntime against PyTorch."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.config import dump_config
from detkit.models import build_model

ROOT = Path(__file__).resolve().parents[1]
ort = pytest.importorskip("onnxruntime")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


export = _load_tool("export")

TINY_MODEL = {
    "type": "OneStageDetector", "num_classes": 3,
    "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c2", "c3", "c4", "c5"]},
    "neck": {"type": "FPN", "out_channels": 16},
    "head": {"type": "CenterNetHead", "in_feature": "p2", "head_channels": 8},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("export")
    model = build_model(TINY_MODEL).eval()
    # Make the heatmap non-trivial so that decoded boxes differ between images.
    with torch.no_grad():
        model.head.heatmap[-1].bias.normal_(0, 1)
        model.head.wh[-1].bias.fill_(4.0)
    torch.save({"model": model.state_dict(), "iter": 1}, tmp / "tiny.pth")
    dump_config({"model": TINY_MODEL}, tmp / "tiny.yaml")
    out = tmp / "tiny.onnx"
    code = export.main([str(tmp / "tiny.yaml"), str(tmp / "tiny.pth"), "--out", str(out),
                        "--size", "64", "96", "--dynamic"])
    assert code == 0
    return model, out


def _reference_outputs(model, x):
    """The raw head outputs computed directly from the detector's parts (no export code)."""
    with torch.no_grad():
        normed = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return model.head(model.neck(model.backbone(normed)))


def test_onnxruntime_matches_pytorch(exported):
    model, path = exported
    info = json.loads(Path(f"{path}.json").read_text())
    assert info["outputs"] == ["heatmap", "wh", "offset"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Another batch size and image size than at export time: the axes are dynamic.
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    got = dict(zip(info["outputs"], session.run(None, {"images": x.numpy()})))
    ref = _reference_outputs(model, x)
    assert got["heatmap"].shape == (2, 3, 24, 32)
    for name in ("heatmap", "wh", "offset"):
        np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-4, rtol=1e-4)


def test_documented_postprocessing_gives_the_model_detections(exported):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    names = [o.name for o in session.get_outputs()]
    outputs = export.unflatten(dict(zip(names, session.run(None, {"images": x.numpy()}))))
    onnx_dets = model.head.predict(outputs, [(64, 96)])[0]
    with torch.no_grad():
        torch_dets = model([x[0]])[0]
    assert len(torch_dets["boxes"]) > 0
    torch.testing.assert_close(onnx_dets["boxes"], torch_dets["boxes"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(onnx_dets["scores"], torch_dets["scores"], atol=1e-4, rtol=1e-4)
    assert torch.equal(onnx_dets["labels"], torch_dets["labels"])


def test_check_reports_small_difference(exported):
    model, path = exported
    diffs = export.check_onnx(model, path, 64, 96)
    assert set(diffs) == {"heatmap", "wh", "offset"} and max(diffs.values()) < 1e-4


def test_flatten_unflatten_round_trip():
    nested = {"a": [torch.ones(1), torch.zeros(2)], "b": {"c": torch.full((3,), 2.0)}}
    flat = export.flatten(nested)
    assert [n for n, _ in flat] == ["a.0", "a.1", "b.c"]
    back = export.unflatten(dict(flat))
    assert isinstance(back["a"], list) and torch.equal(back["a"][1], torch.zeros(2))
    assert torch.equal(back["b"]["c"], nested["b"]["c"])
    levels = [torch.ones(1), torch.ones(2)]            # a YOLO-style list of levels
    assert [t.shape for t in export.unflatten(dict(export.flatten(levels)))] == [(1,), (2,)]


def test_bad_size_and_foreign_checkpoint(tmp_path, capsys):
    dump_config({"model": TINY_MODEL}, tmp_path / "tiny.yaml")
    code = export.main([str(tmp_path / "tiny.yaml"), "none", "--out", str(tmp_path / "x.onnx"),
                        "--size", "60", "64", "--no-check"])
    assert code == 2 and "multiples" in capsys.readouterr().err
    torch.save({"foo": torch.zeros(3)}, tmp_path / "foreign.pth")
    code = export.main([str(tmp_path / "tiny.yaml"), str(tmp_path / "foreign.pth"), "--out",
                        str(tmp_path / "x.onnx"), "--size", "64", "64", "--no-check"])
    assert code == 2 and "refused" in capsys.readouterr().err
