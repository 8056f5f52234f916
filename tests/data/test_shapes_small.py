"""``python -m detkit.data.shapes --preset small``: determinism, COCO-small boxes that match the
drawn pixels."""

import json

import cv2
import numpy as np
import pytest

from detkit.data import shapes

SIZE = 256   # smaller than the preset's 1024 to keep the test fast; same renderer


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_small")
    shapes.generate(out, num_train=2, num_val=1, size=SIZE, seed=3, preset="small")
    return out


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _annotations(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    shapes.generate(tmp_path / "again", num_train=2, num_val=1, size=SIZE, seed=3, preset="small")
    assert _files(small) == _files(tmp_path / "again")
    for rel in _files(small):
        assert (small / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    image, _, _ = shapes.render_small_image(4, "train", 0, SIZE)
    assert not np.array_equal(image, cv2.cvtColor(cv2.imread(str(small / "train" / "000000.png")),
                                                  cv2.COLOR_BGR2RGB))


def test_small_preset_is_not_the_default_stream():
    small_image, _, _ = shapes.render_small_image(0, "train", 0, 128)
    default_image, _, _ = shapes.render_image(0, "train", 0, 128)
    assert not np.array_equal(small_image, default_image)


def test_many_coco_small_objects_per_canvas(small):
    coco = _annotations(small, "train")
    assert coco["images"][0]["width"] == SIZE and coco["images"][0]["height"] == SIZE
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])[1:]
    assert len(per_image) == 2 and per_image.min() >= 20
    for ann in coco["annotations"]:
        _, _, w, h = ann["bbox"]
        assert 8 <= max(w, h) <= 32 and w * h < 32 ** 2, ann["bbox"]
        assert ann["category_id"] in (1, 2, 3, 4) and ann["iscrowd"] == 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_match_the_drawn_pixels(small, split):
    """Every annotated box is exactly one drawn shape: a connected component of the class mask,
    whose pixels in the image stand out from the background ring around the box."""
    coco = _annotations(small, split)
    for img in coco["images"]:
        name = img["file_name"]
        image = cv2.cvtColor(cv2.imread(str(small / split / name)), cv2.COLOR_BGR2RGB).astype(float)
        sem = cv2.imread(str(small / "masks" / split / name), cv2.IMREAD_UNCHANGED)
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        count, _, stats, _ = cv2.connectedComponentsWithStats((sem > 0).astype(np.uint8), connectivity=8)
        components = sorted(tuple(float(v) for v in s[:4]) for s in stats[1:])
        assert components == sorted(tuple(a["bbox"]) for a in anns)
        for ann in anns:
            x, y, w, h = (int(v) for v in ann["bbox"])
            inside = sem[y:y + h, x:x + w] == ann["category_id"]
            assert inside.sum() == ann["area"]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            ring = np.ones((h + 4, w + 4), bool)
            ring[2:-2, 2:-2] = False
            y0, x0 = y - 2, x - 2
            if y0 < 0 or x0 < 0 or y + h + 2 > SIZE or x + w + 2 > SIZE:
                continue
            assert (sem[y0:y + h + 2, x0:x + w + 2][ring] == 0).all()
            background = image[y0:y + h + 2, x0:x + w + 2][ring].mean(0)
            shape = image[y:y + h, x:x + w][inside].mean(0)
            assert np.abs(shape - background).max() > 40, ann
            # polygons are outer contours through the boundary pixels, in canvas coordinates
            points = np.concatenate([np.reshape(poly, (-1, 2)) for poly in ann["segmentation"]])
            assert points.min(0).tolist() == [x, y] and points.max(0).tolist() == [x + w - 1, y + h - 1]


def test_cli_preset_small_and_bad_size(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path / "d"), "--preset", "small", "--train", "1", "--val", "1",
                 "--size", "192"])
    assert "box size:  small" in capsys.readouterr().out
    coco = _annotations(tmp_path / "d", "val")
    assert coco["images"][0]["width"] == 192 and "preset small" in coco["info"]["description"]
    with pytest.raises(SystemExit) as exc:
        shapes.main(["--out", str(tmp_path / "e"), "--preset", "small", "--size", "64"])
    assert exc.value.code == 2
    assert "preset small" in capsys.readouterr().err
