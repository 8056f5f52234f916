"""best.pth / final.pth are float16 inference checkpoints by default (issue 29, finding 12);
last.pth stays exact float32 and is what resume reads; every reader casts float16 back.
Also: ``detkit.train(cfg, work_dir)`` takes a null ``model.num_classes`` from the data.

The float32 opt-out (``train.checkpoint.fp16_inference: false``) is trained by
tests/engine/test_lean_checkpoints.py, whose best.pth equals last.pth bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import detkit
from detkit.config import load_yaml
from detkit.engine import CheckpointError, Trainer, evaluate_checkpoint, load_checkpoint
from detkit.engine.checkpoint import inference_checkpoint
from detkit.inference import Predictor
from detkit.registry import ConfigError

from engine_helpers import base_config


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory):
    """Two iterations of YOLOv3-tiny through the Python API, num_classes left to the data."""
    work = tmp_path_factory.mktemp("fp16")
    cfg = base_config(shapes_root, iters=2, eval_interval=2,
                      checkpoint={"interval": 2, "keep": 1, "best_metric": "bbox/AP"})
    cfg["model"]["num_classes"] = None
    detkit.train(cfg, work)
    assert cfg["model"]["num_classes"] is None                 # the caller's dict is not changed
    return cfg, work


def test_python_api_takes_num_classes_from_the_data(run, shapes_root, tmp_path):
    _, work = run
    stored = load_yaml(load_checkpoint(work / "last.pth")["config"])
    assert stored["model"]["num_classes"] == 4                 # circle, square, triangle, star
    wrong = base_config(shapes_root, iters=1)
    wrong["model"]["num_classes"] = 3
    with pytest.raises(ConfigError, match=r"model.num_classes is 3 but the data has 4 classes"):
        detkit.train(wrong, tmp_path)


def test_best_and_final_hold_float16_last_float32(run):
    _, work = run
    last, best = load_checkpoint(work / "last.pth"), load_checkpoint(work / "best.pth")
    assert best["meta"]["dtype"] == "float16" and "optimizer" not in best and "config" in best
    assert best["meta"]["class_names"] == ["circle", "square", "triangle", "star"]
    assert (work / "final.pth").samefile(work / "best.pth")    # the last evaluation was the best
    for key, value in last["model"].items():
        lean = best["model"][key]
        if value.is_floating_point():
            assert value.dtype == torch.float32 and lean.dtype == torch.float16
            assert torch.equal(lean, value.half())
        else:
            assert torch.equal(lean, value)
    # float16 weights, no optimizer state: well under a third of last.pth
    assert (work / "best.pth").stat().st_size <= 0.3 * (work / "last.pth").stat().st_size


def test_float16_checkpoints_load_for_inference_eval_and_fine_tuning(run, tmp_path):
    cfg, work = run
    image = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    predictors = [Predictor(None, work / f"{n}.pth", score_thr=0.0) for n in ("last", "best")]
    assert all(p.dtype == torch.float32 for p in predictors[1].model.parameters())
    scores = [p.predict_arrays([image])[0]["scores"][:20] for p in predictors]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-2, rtol=0)
    resolved = load_yaml(load_checkpoint(work / "last.pth")["config"])
    metrics = [evaluate_checkpoint(resolved, work / f"{n}.pth", "cpu") for n in ("last", "best")]
    assert metrics[1]["bbox/AP"] == pytest.approx(metrics[0]["bbox/AP"], abs=0.02)
    tuned = Trainer(dict(resolved, train=dict(resolved["train"], load_from=str(work / "best.pth"))),
                    tmp_path / "tune")
    half = load_checkpoint(work / "best.pth")["model"]
    for key, value in tuned.model.state_dict().items():
        assert value.dtype == (torch.float32 if half[key].is_floating_point() else half[key].dtype)
        assert torch.equal(value, half[key].to(value.dtype))


def test_resume_never_reads_best_pth(run, tmp_path, capsys):
    cfg, work = run
    only_best = tmp_path / "only_best"
    only_best.mkdir()
    shutil.copy(work / "best.pth", only_best / "best.pth")
    Trainer(cfg, only_best, resume=True)
    assert "no checkpoint in" in capsys.readouterr().out        # a fresh start, not best.pth
    (only_best / "last.pth").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="no readable checkpoint to resume from") as error:
        Trainer(cfg, only_best, resume=True)
    assert "best.pth" not in str(error.value)
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        Trainer(cfg, tmp_path / "explicit", resume=work / "best.pth")


def test_values_beyond_float16_range_stay_float32():
    state = {"model": {"w": torch.tensor([0.5, -2.0]), "var": torch.tensor([1.0, 7.0e5]),
                       "count": torch.tensor(3)}}
    lean = inference_checkpoint(state, fp16=True)["model"]
    assert lean["w"].dtype == torch.float16 and lean["count"].dtype == torch.int64
    assert lean["var"].dtype == torch.float32 and torch.equal(lean["var"], state["model"]["var"])
