"""Mask R-CNN end to end on a tiny shapes set: tools/train.py -> tools/infer.py (masks drawn,
``segmentation`` RLEs in predictions.json) -> tools/eval.py on that json scores exactly what
tools/eval.py reports for the checkpoint through the dataset loader and COCOEvaluator (bbox and
segm, all 12 numbers)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "mask_rcnn" / "mask_rcnn_r18_fpn_shapes.yaml"
STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_mask_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_infer_eval_with_masks(tmp_path):
    from detkit.data.shapes import generate

    data = generate(tmp_path / "shapes", num_train=16, num_val=6, size=64, seed=5)
    work = tmp_path / "work"
    overrides = [f"data.root={data}", "data.train.num_workers=0", "data.val.num_workers=0",
                 "data.train.batch_size=4", "data.val.batch_size=3"]
    train_overrides = ["train.max_iters=30", "train.eval_interval=0", "train.log_interval=10",
                       "train.scheduler.warmup_iters=5", "train.checkpoint.interval=30"]
    subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), str(CONFIG), "--work-dir",
                    str(work), "--set", *overrides, *train_overrides], check=True, cwd=ROOT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    checkpoint = work / "last.pth"
    evaluate, infer = _tool("eval"), _tool("infer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_json = tmp_path / "model_metrics.json"
        assert evaluate.main([str(CONFIG), str(checkpoint), "--out", str(model_json), "--device", "cpu",
                              "--set", *overrides]) == 0
        gt = data / "annotations" / "instances_val.json"
        out = tmp_path / "infer"
        assert infer.main([str(CONFIG), str(checkpoint), str(data / "val"), "--out", str(out),
                           "--coco-gt", str(gt), "--score-thr", "0", "--set", *overrides]) == 0
        for iou_type in ("bbox", "segm"):
            assert evaluate.main(["--coco-gt", str(gt), "--coco-dt", str(out / "predictions.json"),
                                  "--iou-type", iou_type, "--out", str(tmp_path / f"{iou_type}.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    model_metrics = json.loads(model_json.read_text())
    for iou_type in ("bbox", "segm"):
        file_metrics = json.loads((tmp_path / f"{iou_type}.json").read_text())
        for stat in STATS:
            key = f"{iou_type}/{stat}"
            assert file_metrics[key] == pytest.approx(model_metrics[key], abs=1e-9), key
    assert model_metrics["segm/AR100"] > 0       # not a vacuous 0 == 0
    records = json.loads((out / "predictions.json").read_text())
    assert records and all(mask_utils.decode(r["segmentation"]).shape == (64, 64) for r in records[:20])
    assert len(list(out.glob("*.png"))) == 6     # annotated images (masks blended in)


def test_instance_masks_are_drawn_in_their_class_colours():
    from detkit.visualize import blend_instance_masks, class_color, draw_result

    image = np.full((40, 50, 3), 100, np.uint8)
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 5:20, 5:25] = True
    masks[1, 22:38, 30:48] = True
    out = blend_instance_masks(image, masks, torch.tensor([0, 3]), alpha=0.5)
    inside = np.round(0.5 * 100 + 0.5 * np.array(class_color(3))).astype(np.uint8)
    assert (out[30, 40] == inside).all() and (out[0, 0] == 100).all()   # filled / untouched
    assert not (out[22, 30] == inside).all()                              # the outline differs
    drawn = draw_result(image, {"boxes": torch.tensor([[5.0, 5, 25, 20], [30, 22, 48, 38]]),
                                "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([0, 3]),
                                "masks": masks}, score_thr=0.5)
    assert (drawn[30, 40] == 100).all() and not (drawn[12, 15] == 100).all()  # low score: no mask
    with pytest.raises(ValueError, match="mask size"):
        blend_instance_masks(image, masks[:, :10], torch.tensor([0, 3]))
