"""YOLO-seg polygons (Ultralytics segment labels) as Mask R-CNN instance masks.

References: the COCO reader on the same polygons written as a COCO json (pycocotools decodes
them: exact equality), OpenCV's ``fillPoly`` (equal except on the polygon's outline pixels, which
fillPoly fills too), and the boxes of the polygons' extents.
"""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit.data import CocoDetection, YoloDetection, build_dataset
from detkit.errors import DatasetError

SIZES = {"a.png": (37, 53), "b.png": (64, 48), "c.png": (30, 41)}   # H, W: awkward and non-square


def _star(cx, cy, r_out, r_in, n=5, turn=0.3):
    """A concave star polygon Float[2n,2] (normalised coordinates)."""
    angles = turn + np.arange(2 * n) * math.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)


# file -> (class, normalised polygon or box cx cy w h)
OBJECTS = {
    "a.png": [(0, _star(0.45, 0.5, 0.4, 0.18)), (1, np.array([[0.05, 0.05], [0.3, 0.1], [0.12, 0.4]]))],
    "b.png": [(1, np.array([[0.2, 0.1], [0.9, 0.15], [0.85, 0.7], [0.5, 0.95], [0.1, 0.6]])),
              (0, np.array([0.3, 0.3, 0.25, 0.2]))],                      # a box line: mixed file
    "c.png": [],                                                           # background image
}


def _line(cls, values):
    return f"{cls} " + " ".join(f"{v:.6f}" for v in np.asarray(values).reshape(-1))


@pytest.fixture
def yolo_seg(tmp_path):
    """A YOLO-seg dataset with a data.yaml (train and val the same images)."""
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for name, (h, w) in SIZES.items():
            cv2.imwrite(str(tmp_path / "images" / split / name), rng.integers(0, 255, (h, w, 3), np.uint8))
            if OBJECTS[name]:
                text = "\n".join(_line(c, v) for c, v in OBJECTS[name]) + "\n"
                (tmp_path / "labels" / split / name).with_suffix(".txt").write_text(text)
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"
                                        "names: [star, blob]\n")
    return tmp_path


def _coco_json(path, split):
    """The same polygons (and the box line as a 4-corner polygon) as a COCO json."""
    images, anns = [], []
    for i, (name, (h, w)) in enumerate(sorted(SIZES.items()), 1):
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        for cls, values in OBJECTS[name]:
            if values.ndim == 1:
                cx, cy, bw, bh = values
                values = np.array([[cx - bw / 2, cy - bh / 2], [cx + bw / 2, cy - bh / 2],
                                   [cx + bw / 2, cy + bh / 2], [cx - bw / 2, cy + bh / 2]])
            pixels = values * [w, h]
            x0, y0 = pixels.min(0)
            x1, y1 = pixels.max(0)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cls + 1, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                         "segmentation": [pixels.reshape(-1).tolist()]})
    categories = [{"id": 1, "name": "star"}, {"id": 2, "name": "blob"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def test_masks_equal_coco_reader_and_fillpoly(yolo_seg):
    with pytest.warns(UserWarning, match=r"1 of 4 objects are box lines.*filled boxes"):
        ds = YoloDetection(data_yaml="data.yaml", split="train", root=str(yolo_seg), instance_masks=True)
    coco = CocoDetection("images/train", str(_coco_json(yolo_seg / "train.json", "train")),
                         root=str(yolo_seg), instance_masks=True)
    assert [r.file.name for r in ds.records] == [r.file.name for r in coco.records] == sorted(SIZES)
    checked = 0
    for i, name in enumerate(sorted(SIZES)):
        image, target = ds[i]
        _, reference = coco[i]
        h, w = SIZES[name]
        assert image.shape == (3, h, w)
        assert target["masks"].dtype == torch.bool and target["masks"].shape == (len(OBJECTS[name]), h, w)
        assert torch.equal(target["masks"], reference["masks"]), name
        torch.testing.assert_close(target["boxes"], reference["boxes"], atol=1e-4, rtol=0)   # json xywh
        assert target["labels"].tolist() == [c for c, _ in OBJECTS[name]]
        for mask, box, (_, values) in zip(target["masks"].numpy(), target["boxes"], OBJECTS[name]):
            x0, y0, x1, y1 = box.tolist()
            ys, xs = np.nonzero(mask)
            assert x0 - 0.5 <= xs.min() and xs.max() + 1 <= x1 + 0.5      # the mask fits its box
            assert y0 - 0.5 <= ys.min() and ys.max() + 1 <= y1 + 0.5
            if values.ndim == 1:
                continue
            # OpenCV in pixel-centre coordinates (1/256 px): fills the inside and the outline.
            centres = np.round((values * [w, h] - 0.5) * 256).astype(np.int32)
            filled = np.zeros((h, w), np.uint8)
            outline = np.zeros((h, w), np.uint8)
            cv2.fillPoly(filled, [centres], 1, shift=8)
            cv2.polylines(outline, [centres], True, 1, shift=8)
            assert not (mask & ~filled.astype(bool)).any()
            assert not (filled.astype(bool) & ~mask & ~outline.astype(bool)).any()
            assert mask.sum() > 0.8 * filled.sum()
            checked += 1
    assert checked == 3
    # The ground truth of a segm evaluation: the same masks, areas the mask areas (the val split
    # has them without instance_masks too).
    val = YoloDetection(data_yaml="data.yaml", split="val", root=str(yolo_seg))
    gt = val.coco_gt()
    anns = [a for i in sorted(gt.imgs) for a in gt.imgToAnns[i]]
    coco_anns = [a for i in sorted(coco.coco.imgs) for a in coco.coco.imgToAnns[i]]
    assert len(anns) == len(coco_anns) == 4
    for ann, ref in zip(anns, coco_anns):
        mask = gt.annToMask(ann)
        assert np.array_equal(mask, coco.coco.annToMask(ref)) and ann["area"] == mask.sum()


def test_box_line_mask_is_its_box(yolo_seg):
    with pytest.warns(UserWarning, match="box lines"):
        ds = YoloDetection("images/train", "labels/train", ["star", "blob"], root=str(yolo_seg),
                           instance_masks=True)
    _, target = ds[sorted(SIZES).index("b.png")]
    x0, y0, x1, y1 = target["boxes"][1].tolist()            # 0.3 +- 0.125 of 48, 0.3 +- 0.1 of 64
    ys, xs = np.nonzero(target["masks"][1].numpy())
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (round(x0), round(x1), round(y0), round(y1))
    assert target["masks"][1].sum() == (round(x1) - round(x0)) * (round(y1) - round(y0))
    plain = YoloDetection("images/train", "labels/train", ["star", "blob"], root=str(yolo_seg))
    assert "masks" not in plain[0][1]                        # off by default: boxes only
    torch.testing.assert_close(plain[1][1]["boxes"], target["boxes"])


@pytest.mark.parametrize("line, message", [
    ("0 0.1 0.1 0.5 0.1 0.5", r"b\.txt:2: a polygon line .* odd 5 coordinates"),
    ("1 0.1 0.1 0.5 0.1 0.5 0.5 0.2", r"b\.txt:2: a polygon line .* odd 7 coordinates"),
    ("0 0.1 0.2", r"b\.txt:2: expected 'cls cx cy w h' .* at least 3 points.*3 values"),
])
def test_malformed_polygon_is_one_error_naming_file_and_line(yolo_seg, line, message):
    txt = yolo_seg / "labels" / "train" / "b.txt"
    txt.write_text(_line(0, OBJECTS["b.png"][0][1]) + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=message) as error:
        YoloDetection(data_yaml="data.yaml", split="train", root=str(yolo_seg), instance_masks=True)
    assert "\n" not in str(error.value)


def test_masks_follow_the_pipeline(yolo_seg):
    """Letterbox resize + flip move the masks with the boxes (same transforms as COCO masks)."""
    split = {"dataset": {"type": "YoloDetection", "data_yaml": "data.yaml", "split": "train",
                         "instance_masks": True},
             "pipeline": [{"type": "Letterbox", "size": 96}, {"type": "HorizontalFlip", "p": 1.0}]}
    with pytest.warns(UserWarning, match="box lines"):
        ds = build_dataset(split, root=str(yolo_seg))
    plain = YoloDetection(data_yaml="data.yaml", split="train", root=str(yolo_seg), instance_masks=True)
    image, target = ds[0]
    original = plain[0][1]["masks"]
    assert target["masks"].shape == (2, *image.shape[1:])
    (sx, sy), (ox, oy) = target["scale"].tolist(), target["offset"].tolist()
    assert sx < 0 < sy             # flipped: ``transformed = original * scale + offset``
    for mask, before in zip(target["masks"], original):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        ys0, xs0 = torch.nonzero(before, as_tuple=True)
        expected_x = ((xs0.max().item() + 1) * sx + ox, xs0.min().item() * sx + ox)
        expected_y = (ys0.min().item() * sy + oy, (ys0.max().item() + 1) * sy + oy)
        assert xs.min().item() == pytest.approx(expected_x[0], abs=1.5)
        assert xs.max().item() + 1 == pytest.approx(expected_x[1], abs=1.5)
        assert ys.min().item() == pytest.approx(expected_y[0], abs=1.5)
        assert ys.max().item() + 1 == pytest.approx(expected_y[1], abs=1.5)
        assert mask.sum().item() == pytest.approx(before.sum().item() * -sx * sy, rel=0.1)


def test_data_yaml_trains_mask_rcnn(yolo_seg, tmp_path):
    """``--data data.yaml`` into the Mask R-CNN shapes config keeps ``instance_masks: true``
    and trains 2 iterations with a finite, positive mask loss."""
    from detkit.data.sources import load_training_config
    from detkit.engine.trainer import train
    overrides = ["data.train.num_workers=0", "data.val.num_workers=0", "data.train.batch_size=2",
                 "data.val.batch_size=2", "train.max_iters=2", "train.eval_interval=0",
                 "train.log_interval=1", "train.scheduler.warmup_iters=1", "train.checkpoint.interval=2",
                 "data.image_size=64"]
    config = Path(__file__).resolve().parents[2] / "configs" / "mask_rcnn" / "mask_rcnn_r18_fpn_shapes.yaml"
    cfg = load_training_config(config, overrides, data=yolo_seg / "data.yaml")
    assert cfg["data"]["train"]["dataset"]["instance_masks"] is True
    assert cfg["model"]["num_classes"] == 2
    train(cfg, tmp_path / "work")
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    mask_losses = [rec["loss_mask"] for rec in logged if "loss_mask" in rec]
    assert len(mask_losses) == 2 and all(math.isfinite(v) and v > 0 for v in mask_losses)
    assert any("segm/AP" in rec for rec in logged)          # the final evaluation scored masks
    # Category ids label + 1 on both sides: the evaluator's ground truth and what a checkpoint
    # gives predictions.json (data/README.md says why).
    meta = torch.load(tmp_path / "work" / "last.pth", weights_only=False)["meta"]
    assert meta["label_to_cat_id"] == [1, 2] and meta["class_names"] == ["star", "blob"]
    gt = YoloDetection(data_yaml=str(yolo_seg / "data.yaml"), split="val").coco_gt()
    assert sorted(gt.cats) == [1, 2] and {a["category_id"] for a in gt.anns.values()} == {1, 2}


def test_polygons_far_beyond_the_image_are_clipped():
    """Polygons within twice the image size around it are rasterised untouched (pycocotools on
    the raw polygon: equal); farther ones are clipped to that window, which changes a few
    pixels along the edges at most, and huge coordinates no longer crash pycocotools."""
    from pycocotools import mask as mask_utils

    from detkit.data.polygons import clip_polygon, polygon_masks

    def raw_mask(points):
        rles = mask_utils.frPyObjects([points.reshape(-1).tolist()], h, w)
        return mask_utils.decode(mask_utils.merge(rles))

    rng = np.random.default_rng(7)
    h, w = 33, 47
    for _ in range(20):
        n = int(rng.integers(3, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(5, 45, n)
        centre = rng.uniform([-10, -10], [w + 10, h + 10])
        points = centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
        assert np.array_equal(polygon_masks([points], h, w)[0], raw_mask(points))
        far = centre + 40 * radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
        ours, raw = polygon_masks([far], h, w)[0], raw_mask(far)
        assert (ours != raw).sum() <= 0.02 * h * w
        clipped = clip_polygon(far, w, h, margin=2.0 * w)
        assert ((clipped >= -2 * w - 1e-6) & (clipped <= [3 * w + 1e-6, h + 2 * w + 1e-6])).all()
    huge = np.array([[-1e12, -1e12], [1e12, -1e12], [1e12, 1e12], [-1e12, 1e12]])
    assert polygon_masks([huge], h, w)[0].all()               # the whole image, at once
    assert not polygon_masks([huge - 1e13], h, w)[0].any()   # entirely outside: empty


def test_random_polygon_lines_load_or_give_one_error(tmp_path):
    """Any label text of polygon-like lines: the dataset loads (masks of the image size, inside
    their boxes) or raises DatasetError; never another exception or a crash."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "x.png"), np.zeros((21, 34, 3), np.uint8))
    number = st.one_of(st.floats(-2, 3), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, 1.0, 1e9, -1e30, 0.5]))
    line = st.tuples(st.integers(-1, 2), st.lists(number, min_size=0, max_size=14)).map(
        lambda t: " ".join(map(str, (t[0], *t[1]))))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(line, max_size=4))
    def check(lines):
        (tmp_path / "labels" / "x.txt").write_text("\n".join(lines))
        try:
            ds = YoloDetection("images", "labels", ["a", "b"], root=str(tmp_path), instance_masks=True)
        except DatasetError:
            return
        _, target = ds[0]
        assert target["masks"].shape == (len(target["boxes"]), 21, 34)
        for mask, (x0, y0, x1, y1) in zip(target["masks"].numpy(), target["boxes"].tolist()):
            ys, xs = np.nonzero(mask)
            assert not xs.size or (x0 - 1 <= xs.min() and xs.max() < x1 + 1 and y0 - 1 <= ys.min()
                                   and ys.max() < y1 + 1)

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check()


def test_huge_polygon_ground_truth_matches_the_training_mask(yolo_seg):
    """coco_gt clips as the masks are clipped: the evaluator's pixels are the trained ones (and a
    huge polygon no longer reaches pycocotools, which crashed on it)."""
    huge = "0 -3e7 -3e7 3e7 -3e7 0.5 4e7\n1 0.1 0.1 0.4 0.1 0.2 0.5\n"   # the first covers the image
    (yolo_seg / "labels" / "val" / "a.txt").write_text(huge)
    with pytest.warns(UserWarning, match="box lines"):
        ds = YoloDetection(data_yaml="data.yaml", split="val", root=str(yolo_seg), instance_masks=True)
    gt = ds.coco_gt()
    for i, record in enumerate(ds.records):
        _, target = ds[i]
        anns = gt.imgToAnns[record.image_id]
        assert len(anns) == len(target["masks"])
        for ann, mask in zip(anns, target["masks"].numpy()):
            assert np.array_equal(gt.annToMask(ann).astype(bool), mask) and ann["area"] == mask.sum()
    assert ds[0][1]["masks"][0].all()
