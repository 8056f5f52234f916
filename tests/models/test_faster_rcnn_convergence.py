"""Short convergence check of faster_rcnn_r18_fpn_shapes.yaml through the real trainer.

The full recipe (600 iterations, ~15 min on one CPU thread) reaches COCO AP50 0.87 on the
shapes val split (README "Faster R-CNN"). This run is cut to ITERS iterations (same batch of 8,
twice the peak lr for the short cosine schedule) on a small generated split so that it fits in
~2.5 minutes of one CPU thread, and must clear a lower bar: it measured AP50 0.17 where an
untrained detector scores ~0.
"""

from pathlib import Path

import pytest

from detkit.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "faster_rcnn" / "faster_rcnn_r18_fpn_shapes.yaml"
ITERS = 150
MIN_AP50 = 0.1


@pytest.mark.slow
def test_short_training_reaches_ap50(tmp_path):
    from detkit.data.shapes import generate
    from detkit.engine import train

    data = generate(tmp_path / "shapes", num_train=200, num_val=40, size=128, seed=5)
    cfg = load_config(CONFIG, [
        f"data.root={data}", "data.train.num_workers=0", "data.val.num_workers=0",
        f"train.max_iters={ITERS}", "train.eval_interval=0", "train.log_interval=25",
        "train.scheduler.warmup_iters=20", "train.optimizer.lr=2.0e-3",
        f"train.checkpoint.interval={ITERS}"])
    metrics = train(cfg, tmp_path / "work")
    assert metrics is not None and metrics["bbox/AP50"] >= MIN_AP50, metrics
