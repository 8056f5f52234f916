"""Short convergence test of the shipped tiny YOLOv3 config through the real trainer + evaluator.

32 generated 64 x 64 shapes images, 160 iterations of batch 8 (AdamW 3e-3, cosine), then COCO
evaluation on the same images: an overfitting test (about 1 min on one core) that fails if
assignment, loss, decoding, NMS, the letterbox / scale mapping or the evaluator are broken.
The full-size run (1000 images, AP50 on the held-out val split) is in the README.
"""

from pathlib import Path

import pytest

from detkit.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "yolo" / "yolov3_tiny_shapes.yaml"


@pytest.mark.slow
def test_tiny_yolov3_overfits_small_shapes_set(tmp_path):
    from detkit.data.shapes import generate
    from detkit.engine import train

    root = tmp_path / "shapes"
    generate(root, 32, 1, size=64, seed=0)
    iters = 160
    cfg = load_config(CONFIG, [
        f"data.root={root}", "data.train.num_workers=0", "data.val.num_workers=0",
        "data.train.batch_size=8", "data.train.pipeline=[]", "data.val.pipeline=[]",
        "data.val.dataset.img_dir=train", "data.val.dataset.ann_file=annotations/instances_train.json",
        # shapes are 12..34 px in 64 px images
        "model.head.anchors=[[[11,11],[13,13],[15,15]],[[17,17],[19,19],[22,22]],[[25,25],[29,29],[34,34]]]",
        f"train.max_iters={iters}", f"train.eval_interval={iters}", f"train.log_interval={iters}",
        "train.optimizer.lr=3.0e-3", "train.scheduler.warmup_iters=20",
        f"train.checkpoint.interval={iters}",
    ])
    results = train(cfg, tmp_path / "work")
    assert results["bbox/AP50"] >= 0.8, results
    assert results["bbox/AP"] >= 0.5, results
    assert (tmp_path / "work" / "last.pth").is_file()
