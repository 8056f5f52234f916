"""End to end: train a shapes config briefly, run tools/infer.py on its val images, and check
that the written predictions.json scores exactly what tools/eval.py reports for the checkpoint.

The two paths share nothing after the checkpoint: tools/eval.py runs the dataset loader and
COCOEvaluator; tools/infer.py reads the image files itself, runs the Predictor (test pipeline,
mapping back to original pixels) and writes COCO results that tools/eval.py then scores from
files only (``--coco-gt`` / ``--coco-dt``). All 12 COCO numbers must agree.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "centernet" / "centernet_r18_shapes.yaml"
STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_infer_eval_agree(tmp_path):
    from detkit.data.shapes import generate

    data = generate(tmp_path / "shapes", num_train=32, num_val=8, size=64, seed=3)
    work = tmp_path / "work"
    overrides = [f"data.root={data}", "data.train.num_workers=0", "data.val.num_workers=0",
                 "data.train.batch_size=8", "data.val.batch_size=4"]
    train_overrides = ["train.max_iters=40", "train.eval_interval=0", "train.log_interval=10",
                       "train.scheduler.warmup_iters=5", "train.checkpoint.interval=40"]
    subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), str(CONFIG), "--work-dir",
                    str(work), "--set", *overrides, *train_overrides], check=True, cwd=ROOT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    checkpoint = work / "last.pth"
    assert checkpoint.is_file()

    evaluate, infer = _tool("eval"), _tool("infer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # 2 shared cores: more threads only wait for each other
    try:
        _infer_and_compare(evaluate, infer, data, checkpoint, overrides, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _infer_and_compare(evaluate, infer, data, checkpoint, overrides, tmp_path):
    assert evaluate.main([str(CONFIG), str(checkpoint), "--out", str(tmp_path / "model_metrics.json"),
                          "--device", "cpu", "--set", *overrides]) == 0
    gt = data / "annotations" / "instances_val.json"
    out = tmp_path / "infer"
    assert infer.main([str(CONFIG), str(checkpoint), str(data / "val"), "--out", str(out),
                       "--coco-gt", str(gt), "--score-thr", "0", "--batch-size", "4",
                       "--set", *overrides]) == 0
    assert len(list(out.glob("*.png"))) == 8                    # annotated images
    assert evaluate.main(["--coco-gt", str(gt), "--coco-dt", str(out / "predictions.json"),
                          "--out", str(tmp_path / "file_metrics.json")]) == 0

    model_metrics = json.loads((tmp_path / "model_metrics.json").read_text())
    file_metrics = json.loads((tmp_path / "file_metrics.json").read_text())
    for stat in STATS:
        assert file_metrics[f"bbox/{stat}"] == pytest.approx(model_metrics[f"bbox/{stat}"], abs=1e-9), stat
    # Not a vacuous 0 == 0: the briefly trained model already finds some objects.
    assert model_metrics["bbox/AR100"] > 0 and model_metrics["bbox/AP50"] > 0
    records = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in records} == {p.name for p in (data / "val").glob("*.png")}


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    """`make demo` in miniature: generate, statistics, train, evaluate, annotated images."""
    demo = _tool("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = demo.main(["--data", str(tmp_path / "shapes"), "--work-dir", str(tmp_path / "demo"),
                          "--num-train", "8", "--num-val", "4", "--size", "64", "--iters", "2",
                          "--num-images", "3", "--device", "cpu", "--set",
                          "data.train.batch_size=4", "data.train.num_workers=0",
                          "data.val.num_workers=0", "train.eval_interval=0"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    for step in range(1, 6):
        assert f"[{step}/5]" in out
    assert "per class: circle" in out and "bbox/AP50" in out
    written = sorted(p.name for p in (tmp_path / "demo" / "predictions").glob("*.png"))
    assert written == ["000000.png", "000001.png", "000002.png"]
    assert f"annotated val images: {tmp_path / 'demo' / 'predictions'}" in out
