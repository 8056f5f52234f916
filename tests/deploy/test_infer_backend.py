"""tools/infer.py / Predictor with an exported model: the same predictions.json as the checkpoint."""

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit import Predictor
from detkit.config import dump_config, load_config
from detkit.data.shapes import render_image

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")
CONFIG = "configs/centernet/centernet_r18_shapes.yaml"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}_deploy", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory, confident_model):
    tmp = tmp_path_factory.mktemp("infer_onnx")
    model = confident_model(CONFIG)
    cfg = load_config(ROOT / CONFIG)
    cfg["data"]["root"] = str(tmp / "no_data")           # class names come from the checkpoint
    dump_config(cfg, tmp / "cfg.yaml")
    names = ["circle", "square", "triangle", "star"]
    torch.save({"model": model.state_dict(), "meta": {"class_names": names}}, tmp / "model.pth")
    assert _tool("export").main([str(tmp / "cfg.yaml"), str(tmp / "model.pth"), "--out",
                                 str(tmp / "model.onnx"), "--size", "128", "128", "--dynamic",
                                 "--batch", "2"]) == 0
    images = tmp / "images"
    images.mkdir()
    for i in range(3):                                   # 128 x 128 scenes and one 96 x 160
        cv2.imwrite(str(images / f"s{i}.png"), render_image(0, "val", i, 128)[0][..., ::-1])
    cv2.imwrite(str(images / "wide.png"), render_image(0, "val", 5, 160)[0][:96, :, ::-1])
    return tmp


def _records(folder: Path) -> list[dict]:
    return sorted(json.loads((folder / "predictions.json").read_text()),
                  key=lambda r: (r["file_name"], -r["score"]))


def _assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and len(a) > 10
    for x, y in zip(a, b):
        assert (x["file_name"], x["category_name"]) == (y["file_name"], y["category_name"])
        assert abs(x["score"] - y["score"]) < 1e-4
        np.testing.assert_allclose(x["bbox"], y["bbox"], atol=1e-2)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_infer_with_onnx_writes_the_checkpoints_predictions(exported, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    infer = _tool("infer")
    # batch size 1: in a batch of differently sized images the PyTorch model knows each image's
    # unpadded size (CenterNet drops peaks in the padding), the exported graph does not
    common = [str(exported / "images"), "--score-thr", "0.05", "--batch-size", "1"]
    assert infer.main([str(exported / "cfg.yaml"), str(exported / "model.pth"), *common,
                       "--out", str(exported / "torch")]) == 0
    out = exported / f"deployed_{backend}"
    assert infer.main([str(exported / "cfg.yaml"), str(exported / "model.onnx"), *common,
                       "--backend", backend, "--out", str(out)]) == 0
    _assert_same_records(_records(exported / "torch"), _records(out))
    drawn = cv2.imread(str(out / "wide.png"))
    assert drawn.shape == (96, 160, 3)
    assert np.abs(drawn.astype(int) - cv2.imread(str(exported / "torch" / "wide.png")).astype(int)).max() <= 1


def test_predictor_runs_an_export_without_config_or_model(exported):
    predictor = Predictor(None, exported / "model.onnx", score_thr=0.05)
    assert predictor.class_names == ["circle", "square", "triangle", "star"]
    assert type(predictor.model).__name__ == "DeployedModel"
    reference = Predictor(exported / "cfg.yaml", exported / "model.pth", score_thr=0.05)
    image = render_image(0, "val", 7, 128)[0]
    a, b = reference(image), predictor(image)
    torch.testing.assert_close(b["boxes"], a["boxes"], atol=1e-2, rtol=0)
    assert b["label_names"] == a["label_names"]


def test_backend_mismatch_is_a_clear_error(exported):
    with pytest.raises(ValueError, match="exported .onnx"):
        Predictor(exported / "cfg.yaml", exported / "model.pth", backend="onnxruntime")
    with pytest.raises(ValueError, match="backend must be one of"):
        Predictor(exported / "cfg.yaml", exported / "model.onnx", backend="tensorrt")


def test_cuda_without_the_cuda_provider_falls_back_with_a_warning(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        predictor = Predictor(None, exported / "model.onnx", device="cuda", score_thr=0.05)
    assert predictor.model.runtime.session.get_providers() == ["CPUExecutionProvider"]
    assert len(predictor(render_image(0, "val", 3, 128)[0])["boxes"]) > 0
