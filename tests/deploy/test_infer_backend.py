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


CAT_IDS = [3, 5, 8, 13]                                  # the dataset's ids, not 0..3


@pytest.fixture(scope="module")
def exported(tmp_path_factory, confident_model):
    tmp = tmp_path_factory.mktemp("infer_onnx")
    model = confident_model(CONFIG)
    cfg = load_config(ROOT / CONFIG)
    cfg["data"]["root"] = str(tmp / "no_data")           # class names come from the checkpoint
    dump_config(cfg, tmp / "cfg.yaml")
    names = ["circle", "square", "triangle", "star"]
    torch.save({"model": model.state_dict(), "meta": {"class_names": names, "label_to_cat_id": CAT_IDS}},
               tmp / "model.pth")
    assert _tool("export").main([str(tmp / "cfg.yaml"), str(tmp / "model.pth"), "--out",
                                 str(tmp / "model.onnx"), "--size", "128", "128", "--dynamic",
                                 "--batch", "2"]) == 0
    assert _tool("export").main([str(tmp / "cfg.yaml"), str(tmp / "model.pth"), "--out",
                                 str(tmp / "static.onnx"), "--size", "128", "128", "--no-check"]) == 0
    images = tmp / "images"
    images.mkdir()
    # a folder of mixed sizes: with the default --batch-size (4) portrait, landscape and square
    # images share batches, each padded to the batch's largest size
    for i in range(3):
        cv2.imwrite(str(images / f"s{i}.png"), render_image(0, "val", i, 128)[0][..., ::-1])
    cv2.imwrite(str(images / "wide.png"), render_image(0, "val", 5, 160)[0][:96, :, ::-1])
    cv2.imwrite(str(images / "tall.png"), render_image(0, "val", 6, 150)[0][:, :100, ::-1])
    cv2.imwrite(str(images / "odd.png"), render_image(0, "val", 9, 140)[0][:117, :, ::-1])
    return tmp


def _records(folder: Path) -> list[dict]:
    return sorted(json.loads((folder / "predictions.json").read_text()),
                  key=lambda r: (r["file_name"], -r["score"]))


def _assert_same_records(a: list[dict], b: list[dict]) -> None:
    """Same detections one to one (matched as sets: near-equal scores may swap places): file,
    category id and name, score within 1e-4, box within 0.5 px."""
    assert len(a) == len(b) and len(a) > 10
    unused = list(b)
    for x in a:
        match = next((y for y in unused if (x["file_name"], x["category_id"], x["category_name"])
                      == (y["file_name"], y["category_id"], y["category_name"])
                      and abs(x["score"] - y["score"]) < 1e-4
                      and np.abs(np.subtract(x["bbox"], y["bbox"])).max() <= 0.5), None)
        assert match is not None, f"no equal of {x}"
        unused.remove(match)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_infer_with_onnx_writes_the_checkpoints_predictions(exported, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    infer = _tool("infer")
    common = [str(exported / "images"), "--score-thr", "0.05"]      # the default --batch-size
    torch_out = exported / "torch"
    if not (torch_out / "predictions.json").exists():
        assert infer.main([str(exported / "cfg.yaml"), str(exported / "model.pth"), *common,
                           "--out", str(torch_out)]) == 0
    out = exported / f"deployed_{backend}"
    assert infer.main([str(exported / "cfg.yaml"), str(exported / "model.onnx"), *common,
                       "--backend", backend, "--out", str(out)]) == 0
    records = _records(torch_out)
    _assert_same_records(records, _records(out))
    assert {r["category_id"] for r in records} <= set(CAT_IDS)
    # boxes that end on the right / bottom edge of a non-square image: clipped at its own size
    edges = [r for r in records if r["file_name"] in ("wide.png", "tall.png", "odd.png")
             and any(abs(v - e) < 1e-3 for v, e in ((r["bbox"][0] + r["bbox"][2], 160),
                                                     (r["bbox"][1] + r["bbox"][3], 150)))]
    assert edges, "no box touches an unpadded border: the test cannot see clipping"
    drawn = cv2.imread(str(out / "wide.png"))
    assert drawn.shape == (96, 160, 3)
    assert np.abs(drawn.astype(int) - cv2.imread(str(torch_out / "wide.png")).astype(int)).max() <= 1


def test_static_export_at_another_size_is_one_error_line(exported, capsys):
    code = _tool("infer").main([str(exported / "cfg.yaml"), str(exported / "static.onnx"),
                                str(exported / "images" / "wide.png"), "--out", str(exported / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "exported for 128x128" in err and "--size 96 160" in err and len(err.strip().splitlines()) == 1


def test_predictor_runs_an_export_without_config_or_model(exported):
    predictor = Predictor(None, exported / "model.onnx", score_thr=0.05)
    assert predictor.class_names == ["circle", "square", "triangle", "star"]
    assert predictor.label_to_cat_id == CAT_IDS
    assert type(predictor.model).__name__ == "DeployedModel"
    reference = Predictor(exported / "cfg.yaml", exported / "model.pth", score_thr=0.05)
    images = [render_image(0, "val", 7, 128)[0], render_image(0, "val", 8, 150)[0][:, :90]]
    for a, b in zip(reference(images), predictor(images)):        # one mixed batch
        assert len(a["boxes"]) == len(b["boxes"]) > 5
        torch.testing.assert_close(b["boxes"], a["boxes"], atol=0.5, rtol=0)
        torch.testing.assert_close(b["scores"], a["scores"], atol=1e-4, rtol=0)
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
