"""MixUp wrapper (DEIM's Dense O2O): the blend formula, boxes of both images, the epoch window."""

import numpy as np
import pytest

from detkit.data import build_dataloader, build_dataset, shapes
from detkit.data.mixup import MixUp
from detkit.registry import ConfigError


def _raw(h, w, value, boxes, labels, image_id):
    return {"image": np.full((h, w, 3), value, np.uint8), "boxes": np.asarray(boxes, np.float32),
            "labels": np.asarray(labels, np.int64), "iscrowd": np.zeros(len(labels), bool),
            "image_id": image_id, "orig_size": (h, w), "scale": (1.0, 1.0), "offset": (0.0, 0.0)}


def test_combine_blends_pixels_and_keeps_both_images_boxes():
    first = _raw(40, 60, 200, [[1, 2, 11, 12]], [3], 7)
    other = _raw(20, 30, 100, [[0, 0, 10, 5], [15, 10, 30, 20]], [0, 1], 8)   # half size
    out = MixUp.combine(first, other, 0.45)
    assert out["image"].shape == (40, 60, 3)
    assert np.all(out["image"] == round(0.45 * 200 + 0.55 * 100))
    np.testing.assert_allclose(out["boxes"], [[1, 2, 11, 12], [0, 0, 20, 10], [30, 20, 60, 40]])
    assert out["labels"].tolist() == [3, 0, 1] and out["iscrowd"].tolist() == [False] * 3
    assert out["image_id"] == 7 and out["orig_size"] == (40, 60)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(root, num_train=6, num_val=2, size=64, seed=0)
    return root


def test_epoch_window_and_config(data_root):
    coco = {"type": "CocoDetection", "img_dir": "train", "ann_file": "annotations/instances_train.json"}
    split = {"dataset": {"type": "MixUp", "prob": 1.0, "from_epoch": 1, "until_epoch": 2, "dataset": coco},
             "pipeline": [], "batch_size": 6, "shuffle": False}
    plain = build_dataset({"dataset": coco, "pipeline": []}, root=str(data_root))
    loader = build_dataloader(split, build_dataset(split, root=str(data_root)), train=True, seed=0)
    counts = {}
    for epoch in range(3):
        loader.set_epoch(epoch)
        images, targets = next(iter(loader))
        counts[epoch] = [len(t["boxes"]) for t in targets]
        if epoch != 1:
            assert all(np.array_equal(im.numpy(), plain[i][0].numpy()) for i, im in enumerate(images))
    base = [len(plain[i][1]["boxes"]) for i in range(6)]
    assert counts[0] == counts[2] == base
    assert all(c > b for c, b in zip(counts[1], base))   # every image got the other's boxes too
    with pytest.raises(ConfigError, match=r"data\.train\.dataset\.probb: 'MixUp' has no argument"):
        build_dataset({"dataset": {"type": "MixUp", "probb": 1.0, "dataset": coco}}, root=str(data_root),
                      path="data.train")
    with pytest.raises(ConfigError, match="ratio"):
        build_dataset({"dataset": {"type": "MixUp", "ratio": [0.8, 0.2], "dataset": coco}},
                      root=str(data_root))


def test_draws_independent_of_a_wrapped_mosaic():
    """The loader gives wrapper and wrapped the same per-sample seed: MixUp must not replay Mosaic's
    random stream (its blend decisions would then equal Mosaic's tile decisions)."""
    from detkit.data.mosaic import Mosaic

    class Fake:
        def __len__(self):
            return 4

        def get_raw(self, i):
            return _raw(8, 8, 10 * i, [[0, 0, 4, 4]], [0], i)

    mosaic = Mosaic(Fake(), size=8, prob=0.5)
    mixup = MixUp(mosaic, prob=0.5)
    same = 0
    for seed in range(200):
        mosaic.set_seed(seed)
        mixup.set_seed(seed)
        same += (mosaic.rng.random() < 0.5) == (mixup.rng.random() < 0.5)
    assert 60 < same < 140   # independent: about half agree (identical streams: all 200)
