"""Multi-scale training is seeded from train.seed and its size generator is checkpointed."""

from __future__ import annotations

import pytest

from detkit.engine import load_checkpoint, train

from engine_helpers import base_config, read_metrics

SHORT_EDGES = [32, 48, 64, 80, 96]


@pytest.mark.slow
def test_multiscale_resume_is_exact(shapes_root, tmp_path):
    """8 iterations straight == 4, stop, --resume, 4 more (YOLOv3-tiny, model.multiscale_train on).

    Before the fix the sizes came from an unseeded generator: every run drew other sizes and the
    resumed half restarted the sequence, so the losses differed at every resumed iteration.
    """
    cfg = base_config(shapes_root, iters=8, batch=2)
    cfg["model"]["multiscale_train"] = {"short_edges": SHORT_EDGES}
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_after=4)
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pth")
    assert ckpt["iter"] == 4 and "multiscale" in ckpt["rng"][0]
    train(cfg, tmp_path / "resumed", resume=True)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    keys = [k for k in straight[0] if k.startswith("loss")]
    assert [r["iter"] for r in resumed] == list(range(1, 9)) and keys
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["iter"]
