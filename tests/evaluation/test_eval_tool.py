"""tools/eval.py: file-only COCO and mask-folder modes, a config + checkpoint run, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from detkit.evaluation import SegEvaluator, evaluate_coco_files

from evaluation_helpers import direct_results, make_gt, make_predictions

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("detkit_tools_eval", ROOT / "tools" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coco_file_mode(tmp_path, capsys):
    gt = make_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(direct_results(make_predictions(gt))))
    rc = load_tool().main(["--coco-gt", str(tmp_path / "gt.json"), "--coco-dt", str(tmp_path / "dt.json"),
                           "--out", str(tmp_path / "m.json")])
    assert rc == 0
    expected, _ = evaluate_coco_files(tmp_path / "gt.json", tmp_path / "dt.json")
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(expected)
    assert "Average Precision" in capsys.readouterr().out


def test_seg_folder_mode_and_missing_prediction(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    ev = SegEvaluator(num_classes=3)
    for i in range(3):
        gt = rng.integers(0, 3, (9, 11)).astype(np.uint8)
        gt[0, :4] = 255
        pred = np.where(rng.random((9, 11)) < 0.7, gt % 255, rng.integers(0, 3, (9, 11))).astype(np.uint8)
        palette_gt = Image.fromarray(gt, mode="L").convert("P")  # palette PNG, read back as indices
        palette_gt.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
        palette_gt.save(tmp_path / "gt" / f"{i}.png")
        Image.fromarray(pred, mode="L").save(tmp_path / "pred" / f"{i}.png")
        ev.process([{"image_id": i, "sem_seg": torch.from_numpy(gt.astype(np.int64))}],
                   [{"sem_seg": torch.from_numpy(pred.astype(np.int64))}])
    tool = load_tool()
    rc = tool.main(["--seg-gt", str(tmp_path / "gt"), "--seg-pred", str(tmp_path / "pred"),
                    "--num-classes", "3", "--out", str(tmp_path / "m.json")])
    assert rc == 0
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["sem_seg/mIoU"] == pytest.approx(ev.evaluate()["sem_seg/mIoU"], abs=1e-12)
    (tmp_path / "pred" / "2.png").unlink()
    assert tool.main(["--seg-gt", str(tmp_path / "gt"), "--seg-pred", str(tmp_path / "pred"),
                      "--num-classes", "3"]) == 2
    assert "no prediction" in capsys.readouterr().err


def test_argument_errors():
    tool = load_tool()
    with pytest.raises(SystemExit):
        tool.main(["--coco-gt", "a.json"])
    with pytest.raises(SystemExit):
        tool.main(["cfg.yaml"])
    with pytest.raises(SystemExit):
        tool.main(["cfg.yaml", "ckpt.pth", "--seg-gt", "x"])


def test_config_and_checkpoint_mode(tmp_path, capsys):
    from detkit.data.shapes import generate
    from detkit.models import build_model

    generate(tmp_path / "shapes", 0, 4, size=32, seed=0)
    names = ["background", "circle", "square", "triangle", "star"]
    cfg = {
        "model": {"type": "Segmentor", "num_classes": 5,
                  "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c2", "c3"]},
                  "neck": {"type": "FPN", "out_channels": 8},
                  "head": {"type": "SemanticHead", "in_features": ["p2", "p3"], "channels": 8}},
        "data": {"root": str(tmp_path / "shapes"),
                 "val": {"dataset": {"type": "SemanticSegDataset", "img_dir": "val", "mask_dir": "masks/val",
                                     "class_names": names},
                         "pipeline": [], "batch_size": 2, "num_workers": 0}},
        "evaluation": {"type": "SegEvaluator"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg["model"]).state_dict()}, tmp_path / "ckpt.pth")
    tool = load_tool()
    assert tool.main([str(tmp_path / "cfg.yaml"), str(tmp_path / "ckpt.pth"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["sem_seg/PA"] <= 1.0 and "sem_seg/IoU-star" in metrics
    assert "Semantic segmentation" in capsys.readouterr().out
    # a typo in an override is a clear error, exit code 2
    assert tool.main([str(tmp_path / "cfg.yaml"), str(tmp_path / "ckpt.pth"),
                      "--set", "evaluation.num_clases=5"]) == 2
    assert "num_clases" in capsys.readouterr().err


def test_coco_file_mode_backend_option(tmp_path):
    gt = make_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(direct_results(make_predictions(gt))))
    tool = load_tool()
    written = {}
    for backend in ("faster", "pycocotools"):
        assert tool.main(["--coco-gt", str(tmp_path / "gt.json"), "--coco-dt", str(tmp_path / "dt.json"),
                          "--backend", backend, "--out", str(tmp_path / f"{backend}.json")]) == 0
        written[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    assert written["faster"] == pytest.approx(written["pycocotools"], abs=1e-12)
    with pytest.raises(SystemExit):
        tool.main(["--coco-gt", "a.json", "--coco-dt", "b.json", "--backend", "fast"])
