"""tools/export.py: the CLI around detkit.deploy.export (parity per family: tests/deploy/)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.config import dump_config, load_config
from detkit.deploy.export import ExportError, export_onnx
from detkit.models import build_model

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


export = _load_tool("export")
TINY_MODEL = {
    "type": "OneStageDetector", "num_classes": 3,
    "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c2", "c3", "c4", "c5"]},
    "neck": {"type": "FPN", "out_channels": 16},
    "head": {"type": "CenterNetHead", "in_feature": "p2", "head_channels": 8},
}
CLASSES = ["circle", "square", "star"]


def test_cli_exports_end_to_end_and_writes_metadata(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    with torch.no_grad():                       # spread-out scores, boxes of a few cells
        model.head.heatmap[-1].weight.normal_(0, 0.05)
        model.head.wh[-1].bias.fill_(4.0)
    torch.save({"model": model.state_dict(), "meta": {"class_names": CLASSES}}, tmp_path / "m.pth")
    dump_config({"model": TINY_MODEL}, tmp_path / "m.yaml")
    out = tmp_path / "m.onnx"
    code = export.main([str(tmp_path / "m.yaml"), str(tmp_path / "m.pth"), "--out", str(out),
                        "--size", "64", "96", "--batch", "2", "--dynamic"])
    assert code == 0 and "check passed" in capsys.readouterr().out
    info = json.loads(Path(f"{out}.json").read_text())
    assert info["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    assert info["class_names"] == CLASSES and info["dynamic"] is True
    assert load_config(tmp_path / "m.yaml")["model"] == __import__("yaml").safe_load(info["config"])["model"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_export_leaves_the_callers_model_unchanged(mode, tmp_path):
    model = build_model(TINY_MODEL).train(mode == "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", 64, 64)
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(model.parameters()).device.type == "cpu"


def test_dcn_config_is_a_clear_error(tmp_path, capsys):
    code = export.main([str(ROOT / "configs/centernet/centernet_r18_dcn_coco.yaml"), "none", "--out",
                        str(tmp_path / "x.onnx"), "--size", "64", "64",
                        "--set", "model.backbone.weights=null"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "neck.stages.0.conv.conv" in err and "DeformConv" in err and "without DCN" in err
    assert not (tmp_path / "x.onnx").exists()


def test_generic_tta_is_refused_with_the_override_to_use(tmp_path):
    cfg = dict(TINY_MODEL, test_time_aug={"scales": [1.0], "flip": True})
    with pytest.raises(ExportError, match="model.test_time_aug=null"):
        export_onnx(build_model(cfg), tmp_path / "x.onnx", 64, 64)


def test_bad_size_and_foreign_checkpoint(tmp_path, capsys):
    dump_config({"model": TINY_MODEL}, tmp_path / "tiny.yaml")
    code = export.main([str(tmp_path / "tiny.yaml"), "none", "--out", str(tmp_path / "x.onnx"),
                        "--size", "60", "64", "--no-check"])
    assert code == 2 and "multiples" in capsys.readouterr().err
    torch.save({"foo": torch.zeros(3)}, tmp_path / "foreign.pth")
    code = export.main([str(tmp_path / "tiny.yaml"), str(tmp_path / "foreign.pth"), "--out",
                        str(tmp_path / "x.onnx"), "--size", "64", "64", "--no-check"])
    assert code == 2 and "refused" in capsys.readouterr().err


def test_rfcn_psroialign_below_opset_16_is_refused(tmp_path, capsys):
    """ONNX RoiAlign has no half-pixel mode before opset 16: torchvision's legacy form shifted
    every R-FCN box (100/100 detections wrong) with only a warning."""
    code = export.main([str(ROOT / "configs/rfcn/rfcn_r18_shapes.yaml"), "none", "--out",
                        str(tmp_path / "x.onnx"), "--size", "64", "64", "--opset", "15"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--opset 16" in err
    assert not (tmp_path / "x.onnx").exists()


def test_metadata_carries_category_ids_and_the_graph_inputs(tmp_path):
    torch.save({"model": build_model(TINY_MODEL).state_dict(),
                "meta": {"class_names": CLASSES, "label_to_cat_id": [1, 7, 9]}}, tmp_path / "m.pth")
    dump_config({"model": TINY_MODEL}, tmp_path / "m.yaml")
    out = tmp_path / "m.onnx"
    assert export.main([str(tmp_path / "m.yaml"), str(tmp_path / "m.pth"), "--out", str(out),
                        "--size", "64", "64", "--no-check"]) == 0
    info = json.loads(Path(f"{out}.json").read_text())
    assert info["label_to_cat_id"] == [1, 7, 9] and info["inputs"] == ["images", "image_sizes"]
    import onnx

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images", "image_sizes"]
    default = next(t for t in graph.initializer if t.name == "image_sizes")
    assert list(default.dims) == [1, 2]


def _as_outputs(boxes, scores, labels):
    return {"boxes": np.array([boxes], np.float32), "scores": np.array([scores], np.float32),
            "labels": np.array([labels], np.int64), "num_detections": np.array([len(scores)])}


def test_check_compares_coordinates_so_zero_area_boxes_match():
    """An untrained CenterNet's zero-area boxes (IoU 0/0 with themselves) are equal detections."""
    from detkit.deploy.check import compare_detections

    boxes = [[324.0, 464.0, 324.0, 464.0], [10.0, 10.0, 30.0, 40.0]]
    ref = [{"boxes": torch.tensor(boxes), "scores": torch.tensor([0.5, 0.4]),
            "labels": torch.tensor([2, 1])}]
    assert compare_detections(_as_outputs(boxes, [0.5, 0.4], [2, 1]), ref, 512) == []
    moved = [[324.0, 464.0, 325.0, 464.0], [10.0, 10.0, 30.0, 40.0]]
    problems = compare_detections(_as_outputs(moved, [0.5, 0.4], [2, 1]), ref, 512)
    assert len(problems) == 1 and "1 PyTorch detections have no equal" in problems[0]


def test_check_names_score_ties():
    """Random-weight YOLOv3-tiny scores every candidate 0.0050000 +- 1e-7: which of tied boxes
    top-k and NMS keep is not defined, and the message says the differences are ties."""
    from detkit.deploy.check import compare_detections

    ref = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10], [40.0, 0, 50, 10]]),
            "scores": torch.tensor([0.0050001, 0.0050000, 0.0050000]), "labels": torch.tensor([0, 0, 0])}]
    out = _as_outputs([[0.0, 0, 10, 10], [20.0, 0, 30, 10], [60.0, 0, 70, 10], [80.0, 0, 90, 10]],
                      [0.0050001, 0.0050000, 0.0050000, 0.0050000], [0, 0, 0, 0])
    problems = compare_detections(out, ref, 128)
    assert problems == [problems[0]] and "4 detections, PyTorch 3" in problems[0]
    assert "1 PyTorch detections have no equal in the exported output (1 of them tie" in problems[0]


def test_check_tells_a_tie_at_the_last_place_from_a_moved_box():
    """An untrained CenterNet's 100th place: PyTorch keeps one of two equal neighbouring peaks,
    onnxruntime the other (a tie); a box that only moved (clipped elsewhere) is not a tie."""
    from detkit.deploy.check import compare_detections

    ref = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [324.0, 464, 324, 464]]),
            "scores": torch.tensor([0.3, 0.105772]), "labels": torch.tensor([0, 30])}]
    tie = _as_outputs([[0.0, 0, 10, 10], [328.0, 464, 328, 464]], [0.3, 0.105772], [0, 30])
    assert "(1 of them tie" in compare_detections(tie, ref, 512)[0]
    moved = _as_outputs([[0.0, 0, 10, 10], [324.0, 460, 324, 464]], [0.3, 0.105772], [0, 30])
    moved["boxes"][0, 1] = [300.0, 440, 330, 470]
    ref[0]["boxes"][1] = torch.tensor([300.0, 440, 334, 470])
    assert "(0 of them tie" in compare_detections(moved, ref, 512)[0]
