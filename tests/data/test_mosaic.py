"""Mosaic wrapper: tile placement and box moves by hand, boxes stay on their pixels, seeding,
config building on the shapes dataset."""

import numpy as np
import pytest

from detkit.data.mosaic import Mosaic
from detkit.registry import ConfigError


def raw_sample(image_id, h, w, boxes, colour, iscrowd=None):
    """A raw dict whose boxes are filled rectangles of ``colour`` on a black image."""
    image = np.zeros((h, w, 3), np.uint8)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = colour
    n = len(boxes)
    return {"image": image, "boxes": boxes, "labels": np.arange(n, dtype=np.int64) % 3,
            "iscrowd": np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd, bool),
            "image_id": image_id, "orig_size": (h, w), "scale": (1.0, 1.0), "offset": (0.0, 0.0)}


class FakeDataset:
    class_names = ["a", "b", "c"]
    label_to_cat_id = [1, 2, 3]

    def __init__(self, raws):
        self.raws = raws

    def __len__(self):
        return len(self.raws)

    def get_raw(self, index):
        r = self.raws[index]
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in r.items()}

    def aspect_ratios(self):
        return [r["image"].shape[1] / r["image"].shape[0] for r in self.raws]


def test_combine_places_tiles_and_moves_boxes_by_hand():
    # centre fixed at (32, 32) of a 64x64 canvas; 64x64 tiles are not resized
    tl = raw_sample(7, 64, 64, [[40, 40, 50, 50],    # -> [8, 8, 18, 18]
                                [0, 0, 10, 10],      # outside the shown bottom-right quarter: dropped
                                [28, 28, 48, 48],    # 16x16 of 20x20 visible (64%): kept, [0, 0, 16, 16]
                                [20, 40, 36, 50],    # 4x10 of 16x10 visible (25% < 30%): dropped
                                [0, 0, 34, 34]],     # crowd: 2x2 visible, kept as [0, 0, 2, 2]
                    (255, 0, 0), iscrowd=[0, 0, 0, 0, 1])
    # TR shows x 0..32, y 32..64 -> [37, 8, 47, 28]
    tr = raw_sample(8, 64, 64, [[5, 40, 15, 60]], (0, 255, 0))
    # BL shows x 32..64, y 0..32 -> [18, 34, 28, 44]
    bl = raw_sample(9, 64, 64, [[50, 2, 60, 12]], (0, 0, 255))
    # 32x16 -> resized 2x to 64x32 -> [36, 36, 44, 52]
    br = raw_sample(10, 32, 16, [[2, 2, 6, 10]], (255, 255, 0))
    m = Mosaic(FakeDataset([tl]), size=64, center_range=(0.5, 0.5), pad_value=114)
    out = m.combine([tl, tr, bl, br])
    expected = [[8, 8, 18, 18], [0, 0, 16, 16], [0, 0, 2, 2], [37, 8, 47, 28], [18, 34, 28, 44],
                [36, 36, 44, 52]]
    np.testing.assert_allclose(out["boxes"], expected)
    assert out["labels"].tolist() == [0, 2, 1, 0, 0, 0]
    assert out["iscrowd"].tolist() == [False, False, True, False, False, False]
    assert out["image"].shape == (64, 64, 3) and out["orig_size"] == (64, 64)
    assert out["image_id"] == 7 and out["scale"] == (1.0, 1.0) and out["offset"] == (0.0, 0.0)
    # boxes sit on their rectangles (the resized tile: inside its blurred 1-px edge)
    assert (out["image"][8:18, 8:18] == (255, 0, 0)).all()
    assert (out["image"][37:51, 37:43] == (255, 255, 0)).all()
    assert "difficult" not in out and "sem_seg" not in out


def test_padding_where_no_tile_reaches():
    small = raw_sample(1, 16, 16, [[4, 4, 12, 12]], (10, 20, 30))
    m = Mosaic(FakeDataset([small]), size=(64, 96), center_range=(0.5, 0.5))
    # 16x16 tiles are enlarged to 64x64 (fit in 64x96); centre (48, 32): TL shows tile pixels
    # x 16..64, y 32..64 at x 0..48, y 0..32, so its box [16,16,48,48] -> [0,-16,32,16] -> clipped
    out = m.combine([small] * 4)
    assert out["image"].shape == (64, 96, 3)
    assert not (out["image"] == 114).all(axis=-1).any()       # the four tiles cover the canvas
    np.testing.assert_allclose(out["boxes"][0], [0, 0, 32, 16])
    m2 = Mosaic(FakeDataset([small]), size=64, center_range=(0.5, 0.5))
    tiny = raw_sample(2, 64, 8, [], (0, 0, 0))                             # 64x8 -> stays 64x8
    out2 = m2.combine([tiny] * 4)
    assert (out2["image"][:, :24] == 114).all() and (out2["image"][:, 40:] == 114).all()
    assert out2["boxes"].shape == (0, 4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_boxes_stay_on_their_pixels(seed):
    rng = np.random.default_rng(seed)
    raws = []
    for i in range(4):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        x1, y1 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        raws.append(raw_sample(i, h, w, [[x1, y1, x1 + 16, y1 + 16]], (50 * (i + 1), 200, 255 - 40 * i)))
    m = Mosaic(FakeDataset(raws), size=80, min_visible=0.0)
    m.set_seed(seed)
    out = m.combine(raws)
    assert len(out["boxes"]) >= 1
    for box in out["boxes"].round().astype(int):
        x1, y1, x2, y2 = box
        inner = out["image"][y1 + 1:y2 - 1, x1 + 1:x2 - 1].reshape(-1, 3)
        if len(inner):
            # the colour inside every box is the one colour of some source rectangle
            colours = {tuple(r["image"][int(r["boxes"][0, 1]) + 1, int(r["boxes"][0, 0]) + 1]) for r in raws}
            assert tuple(np.median(inner, axis=0).astype(int)) in colours


def test_prob_seed_and_delegation():
    raws = [raw_sample(i, 50, 70, [[5, 5, 30, 30]], (i * 40, 0, 0)) for i in range(5)]
    plain = Mosaic(FakeDataset(raws), size=64, prob=0.0)
    assert plain.get_raw(2)["image"].shape == (50, 70, 3)
    mosaic = Mosaic(FakeDataset(raws), size=64, prob=1.0)
    mosaic.set_seed(5)
    a = mosaic.get_raw(1)
    mosaic.set_seed(5)
    b = mosaic.get_raw(1)
    mosaic.set_seed(6)
    c = mosaic.get_raw(1)
    assert a["image"].shape == (64, 64, 3) and a["image_id"] == 1
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"]) or not np.array_equal(a["boxes"], c["boxes"])
    image, target = mosaic[3]
    assert tuple(image.shape) == (3, 64, 64) and float(image.max()) <= 1.0
    assert target["boxes"].shape[1] == 4 and target["orig_size"].tolist() == [64, 64]
    assert mosaic.class_names == ["a", "b", "c"] and len(mosaic) == 5
    assert mosaic.aspect_ratios() == [1.0] * 5 and plain.aspect_ratios()[0] == pytest.approx(1.4)
    with pytest.raises(ValueError, match="prob"):
        Mosaic(FakeDataset(raws), size=64, prob=1.5)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from detkit.data.shapes import generate
    root = tmp_path_factory.mktemp("shapes")
    generate(root, 6, 2, size=64, seed=0)
    return root


def test_build_from_config_with_pipeline(shapes_root):
    from detkit.data import build_dataset
    from detkit.data.loader import seed_dataset
    split = {"dataset": {"type": "Mosaic", "size": 96, "prob": 1.0,
                         "dataset": {"type": "CocoDetection", "img_dir": "train",
                                     "ann_file": "annotations/instances_train.json"}},
             "pipeline": [{"type": "Letterbox", "size": 96}, {"type": "HorizontalFlip", "p": 0.5}]}
    ds = build_dataset(split, root=str(shapes_root))
    assert isinstance(ds, Mosaic) and ds.dataset.transforms is None
    assert ds.class_names == ["circle", "square", "triangle", "star"]
    assert len(ds.coco_gt().getImgIds()) == 6
    seed_dataset(ds, 3)
    image, target = ds[0]
    seed_dataset(ds, 3)
    image2, _ = ds[0]
    assert tuple(image.shape) == (3, 96, 96) and (image == image2).all()
    boxes = target["boxes"]
    assert len(boxes) > 0 and (boxes >= 0).all() and (boxes <= 96).all()
    assert target["labels"].max() < 4


def test_config_errors(shapes_root):
    from detkit.data import build_dataset
    inner = {"type": "CocoDetection", "img_dir": "train", "ann_file": "annotations/instances_train.json"}
    with pytest.raises(ConfigError, match="data.train.dataset.*size"):
        build_dataset({"dataset": {"type": "Mosaic", "dataset": inner}}, root=str(shapes_root),
                      path="data.train")
    with pytest.raises(ConfigError, match="probb.*did you mean 'prob'"):
        build_dataset({"dataset": {"type": "Mosaic", "dataset": inner, "size": 64, "probb": 1}},
                      root=str(shapes_root), path="data.train")
    with pytest.raises(ConfigError, match="center_range"):
        build_dataset({"dataset": {"type": "Mosaic", "dataset": inner, "size": 64,
                                   "center_range": [0.8, 0.2]}},
                      root=str(shapes_root), path="data.train")
