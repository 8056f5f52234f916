"""The built-in shapes generator: layout, determinism, tight boxes, masks and statistics."""

import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detkit.data import shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, num_train=8, num_val=3, size=96, seed=5)
    return out


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout(tiny):
    assert [p.name for p in sorted((tiny / "train").iterdir())] == [f"{i:06d}.png" for i in range(8)]
    assert len(list((tiny / "val").iterdir())) == 3
    assert len(list((tiny / "masks" / "train").iterdir())) == 8
    coco = json.loads((tiny / "annotations" / "instances_val.json").read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [
        (1, "circle"), (2, "square"), (3, "triangle"), (4, "star")]
    assert len(coco["images"]) == 3 and coco["images"][0]["height"] == 96
    image = cv2.imread(str(tiny / "val" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8


def test_same_seed_same_bytes_and_other_seed_differs(tiny, tmp_path):
    shapes.generate(tmp_path / "again", num_train=8, num_val=3, size=96, seed=5)
    files = _files(tiny)
    assert files == _files(tmp_path / "again")
    for rel in files:
        assert (tiny / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    shapes.generate(tmp_path / "other", num_train=8, num_val=3, size=96, seed=6)
    other = (tmp_path / "other" / "train" / "000000.png").read_bytes()
    assert other != (tiny / "train" / "000000.png").read_bytes()


def test_regenerating_fewer_images_removes_stale_files(tmp_path):
    shapes.generate(tmp_path, num_train=4, num_val=2, size=64, seed=0)
    shapes.generate(tmp_path, num_train=2, num_val=1, size=64, seed=0)
    assert len(list((tmp_path / "train").iterdir())) == 2
    assert len(list((tmp_path / "masks" / "val").iterdir())) == 1


def test_boxes_are_tight_around_visible_pixels(tiny):
    for split in ("train", "val"):
        coco = json.loads((tiny / "annotations" / f"instances_{split}.json").read_text())
        counts = {img["id"]: 0 for img in coco["images"]}
        for ann in coco["annotations"]:
            counts[ann["image_id"]] += 1
            name = f"{ann['image_id'] - 1:06d}.png"
            sem = cv2.imread(str(tiny / "masks" / split / name), cv2.IMREAD_UNCHANGED)
            x, y, w, h = (int(v) for v in ann["bbox"])
            assert ann["bbox"] == [float(x), float(y), float(w), float(h)] and w > 0 and h > 0
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 4
            inside = sem[y: y + h, x: x + w] == ann["category_id"]
            # Tight: every edge row / column of the box holds a pixel of the object's class.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert ann["area"] <= inside.sum()      # its visible pixels all have its class
            # The polygon rasterised by pycocotools covers about the same pixels as the box region.
            rle = mask_utils.frPyObjects(ann["segmentation"], 96, 96)
            poly_area = float(mask_utils.area(mask_utils.merge(rle)))
            assert 0.6 * ann["area"] < poly_area < 1.3 * ann["area"] + 10
        assert all(1 <= c <= 8 for c in counts.values()), counts


def test_masks_hold_only_known_values(tiny):
    for p in (tiny / "masks" / "train").iterdir():
        values = set(np.unique(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)).tolist())
        assert values <= {0, 1, 2, 3, 4, 255}
        assert values & {1, 2, 3, 4}


def test_stats_and_cli(tiny, capsys):
    s = shapes.stats(tiny)
    coco = json.loads((tiny / "annotations" / "instances_train.json").read_text())
    assert s["train"]["images"] == 8 and s["train"]["instances"] == len(coco["annotations"])
    for k, name in enumerate(shapes.CLASS_NAMES, 1):
        assert s["train"]["per_class"][name] == sum(a["category_id"] == k for a in coco["annotations"])
    small = sum(a["bbox"][2] * a["bbox"][3] < 32 ** 2 for a in coco["annotations"])
    assert s["train"]["sizes"]["small"] == small
    assert sum(s["train"]["sizes"].values()) == s["train"]["instances"]
    shapes.main(["--stats", str(tiny)])
    out = capsys.readouterr().out
    assert "train: 8 images" in out and "val: 3 images" in out
    with pytest.raises(FileNotFoundError):
        shapes.stats(tiny / "nowhere")
