"""best.pth / final.pth hold only what inference needs; last.pth keeps the training state;
tools/strip_checkpoint.py shrinks existing files. Every reader still works with both kinds."""

import importlib.util

import numpy as np
import pytest
import torch

from detkit.engine import CheckpointError, evaluate_checkpoint, load_checkpoint, train
from detkit.inference import Predictor

from engine_helpers import REPO, base_config

TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "ema", "rng", "sampler")


def _strip_tool():
    spec = importlib.util.spec_from_file_location("detkit_strip_cli", REPO / "tools/strip_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory):
    """Two iterations of the YOLOv3-tiny shapes config, SGD with momentum, EMA off; float32
    best.pth (the float16 default is tests/engine/test_fp16_checkpoints.py's)."""
    work = tmp_path_factory.mktemp("lean")
    cfg = base_config(shapes_root, iters=2, eval_interval=2,
                      checkpoint={"interval": 2, "keep": 1, "best_metric": "bbox/AP",
                                  "fp16_inference": False})
    assert cfg["train"]["optimizer"]["momentum"] > 0 and not cfg["train"]["ema"]["enabled"]
    train(cfg, work)
    return cfg, work


def test_best_and_final_are_inference_checkpoints(run):
    _, work = run
    last, best, final = (load_checkpoint(work / f"{n}.pth") for n in ("last", "best", "final"))
    assert all(k in last for k in TRAINING_ONLY[:3]) and last["optimizer"]["state"]   # momentum buffers
    for lean in (best, final):
        assert not set(TRAINING_ONLY) & set(lean)
        assert lean["meta"]["class_names"] == ["circle", "square", "triangle", "star"]
        assert lean["meta"]["weights"] == "model" and lean["iter"] == 2 and "config" in lean
        assert lean["model"].keys() == last["model"].keys()
        assert all(torch.equal(lean["model"][k], last["model"][k]) for k in last["model"])
    # Weights once instead of weights + one momentum buffer per parameter.
    assert (work / "best.pth").stat().st_size <= 0.55 * (work / "last.pth").stat().st_size


def test_readers_take_both_kinds(run):
    cfg, work = run
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    outputs = [Predictor(None, work / f"{n}.pth", device="cpu", score_thr=0.0).predict_arrays([image])[0]
               for n in ("last", "best")]
    torch.testing.assert_close(outputs[0]["scores"], outputs[1]["scores"])
    metrics = [evaluate_checkpoint(cfg, work / f"{n}.pth", "cpu") for n in ("best", "last")]
    assert metrics[0] == metrics[1]
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        train(cfg, work / "again", resume=work / "best.pth")


def test_strip_tool(run, tmp_path, capsys):
    _, work = run
    tool = _strip_tool()
    assert tool.main([str(work / "last.pth")]) == 2                     # in place only with --force
    assert "resume checkpoint" in capsys.readouterr().err
    assert tool.main([str(work / "last.pth"), "--out", str(tmp_path / "w.pth"), "--fp16"]) == 0
    half = load_checkpoint(tmp_path / "w.pth")
    assert not set(TRAINING_ONLY) & set(half) and half["meta"]["dtype"] == "float16"
    assert (tmp_path / "w.pth").stat().st_size <= 0.3 * (work / "last.pth").stat().st_size
    full = load_checkpoint(work / "last.pth")["model"]
    for key, value in half["model"].items():
        assert value.dtype == (torch.float16 if full[key].is_floating_point() else full[key].dtype)
        torch.testing.assert_close(value.to(full[key].dtype), full[key], atol=2e-3, rtol=1e-3)
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    scores = [Predictor(None, path, device="cpu", score_thr=0.0).predict_arrays([image])[0]["scores"]
              for path in (work / "last.pth", tmp_path / "w.pth")]
    torch.testing.assert_close(scores[1][:10], scores[0][:10], atol=1e-2, rtol=0)   # float16 weights
    (tmp_path / "bad.pth").write_bytes(b"x")
    assert tool.main([str(tmp_path / "bad.pth")]) == 2
    assert "bad.pth" in capsys.readouterr().err
