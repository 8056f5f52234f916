"""Instance masks in the data path: CocoDetection decodes polygons, RLE and crowd RLE into one
mask per box; every transform moves them with their boxes (flip, letterbox padding, a crop that
drops a box, multiscale_train); the shapes dataset yields them; VOC has none (clear errors)."""

import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from detkit.data import CocoDetection, VOCDetection, build_dataset
from detkit.data.transforms import build_pipeline
from detkit.models import build_model
from detkit.models.multiscale import MultiScaleTrain
from detkit.registry import ConfigError


def _coco_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), np.full((40, 60, 3), 90, np.uint8))
    rle_mask = np.zeros((40, 60), np.uint8, order="F")
    rle_mask[20:35, 40:58] = 1
    rle = mask_utils.encode(rle_mask)
    crowd = np.zeros((40, 60), np.uint8)
    crowd[2:12, 30:50] = 1
    counts, run, value = [], 0, 0   # uncompressed RLE (column-major runs), as COCO stores crowds
    for pixel in crowd.flatten(order="F"):
        if pixel != value:
            counts.append(run)
            run, value = 0, pixel
        run += 1
    counts.append(run)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 6, 16, 20], "area": 320, "iscrowd": 0,
         "segmentation": [[4, 6, 20, 6, 20, 26, 4, 26]]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 20, 18, 15], "area": 270, "iscrowd": 0,
         "segmentation": {"size": [40, 60], "counts": rle["counts"].decode("ascii")}},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [30, 2, 20, 10], "area": 200, "iscrowd": 1,
         "segmentation": {"size": [40, 60], "counts": counts}},
    ]
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path


def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_polygon_rle_and_crowd_rle_become_one_mask_per_box(tmp_path):
    ds = CocoDetection("imgs", "ann.json", root=str(_coco_root(tmp_path)), instance_masks=True)
    raw = ds.get_raw(0)
    assert raw["masks"].dtype == np.uint8 and raw["masks"].shape == (3, 40, 60)
    _, target = ds[0]
    masks = target["masks"]
    assert masks.dtype == torch.bool and masks.shape == (3, 40, 60)
    assert target["iscrowd"].tolist() == [False, False, True]       # the crowd mask: an ignored box
    assert masks[0, 6:26, 4:20].all() and masks[0].sum() == 16 * 20  # polygon
    assert masks[1, 20:35, 40:58].all() and masks[1].sum() == 15 * 18  # compressed RLE
    assert masks[2, 2:12, 30:50].all() and masks[2].sum() == 10 * 20  # uncompressed crowd RLE
    assert "masks" not in CocoDetection("imgs", "ann.json", root=str(tmp_path))[0][1]  # off by default


def test_annotation_without_segmentation_is_a_clear_error(tmp_path):
    root = _coco_root(tmp_path)
    coco = json.loads((root / "ann.json").read_text())
    del coco["annotations"][1]["segmentation"]
    (root / "ann.json").write_text(json.dumps(coco))
    ds = CocoDetection("imgs", "ann.json", root=str(root), instance_masks=True)
    with pytest.raises(ValueError, match="annotation id 2 .*no 'segmentation'"):
        ds[0]


@pytest.mark.parametrize("pipeline", [
    [{"type": "HorizontalFlip", "p": 1.0}],
    [{"type": "Letterbox", "size": [64, 64]}],
    [{"type": "ResizeShortestEdge", "short_edge": 60, "max_size": 100},
     {"type": "PadToMultiple", "divisor": 32}],
    [{"type": "Crop", "x_min": 0, "y_min": 0, "x_max": 36, "y_max": 40}],   # drops the RLE box
])
def test_masks_move_with_their_boxes(tmp_path, pipeline):
    ds = CocoDetection("imgs", "ann.json", root=str(_coco_root(tmp_path)), instance_masks=True,
                       transforms=build_pipeline(pipeline))
    image, target = ds[0]
    masks, boxes = target["masks"], target["boxes"]
    assert masks.shape == (len(boxes), *image.shape[1:])
    assert len(boxes) == (2 if "Crop" in str(pipeline) else 3)
    for box, mask in zip(boxes.tolist(), masks):
        assert np.abs(np.array(_mask_box(mask)) - np.array(box)).max() <= 1.0, (box, _mask_box(mask))
    if "Letterbox" in str(pipeline) or "Pad" in str(pipeline):
        # Padding is background for instance masks (not the semantic map's 255 "ignore").
        (sx, sy), (ox, oy) = target["scale"].tolist(), target["offset"].tolist()
        inside = torch.zeros(image.shape[1:], dtype=torch.bool)
        inside[round(oy):round(oy + 40 * sy), round(ox):round(ox + 60 * sx)] = True
        assert not inside.all() and not (masks & ~inside).any()


def test_multiscale_train_resizes_the_masks():
    masks = torch.zeros(1, 40, 60, dtype=torch.bool)
    masks[0, 10:30, 20:40] = True
    target = {"boxes": torch.tensor([[20.0, 10, 40, 30]]), "masks": masks}
    _, (out,) = MultiScaleTrain(short_edges=[80])([torch.rand(3, 40, 60)], [target])
    assert out["masks"].shape == (1, 80, 120) and out["masks"].dtype == torch.bool
    assert _mask_box(out["masks"][0]) == out["boxes"][0].tolist() == [40.0, 20.0, 80.0, 60.0]


def test_shapes_dataset_gives_instance_masks_matching_the_boxes(tmp_path):
    from detkit.data.shapes import generate

    root = generate(tmp_path / "shapes", num_train=3, num_val=0, size=64, seed=3)
    ds = CocoDetection("train", "annotations/instances_train.json", root=str(root), instance_masks=True)
    for i in range(len(ds)):
        _, target = ds[i]
        assert target["masks"].shape[0] == len(target["boxes"]) > 0
        for box, mask in zip(target["boxes"].tolist(), target["masks"]):
            # polygons trace the visible pixels' centres: at most a pixel or two shorter per side
            assert np.abs(np.array(_mask_box(mask)) - np.array(box)).max() <= 3.0


def _voc(tmp_path):
    base = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    cv2.imwrite(str(base / "JPEGImages" / "000001.jpg"), np.full((32, 32, 3), 60, np.uint8))
    (base / "Annotations" / "000001.xml").write_text(
        "<annotation><size><width>32</width><height>32</height><depth>3</depth></size><object><name>dog"
        "</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>25</ymax>"
        "</bndbox></object></annotation>")
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    return tmp_path


def test_voc_with_a_mask_config_is_a_clear_error(tmp_path):
    root = _voc(tmp_path)
    with pytest.raises(ConfigError, match="instance_masks"):
        build_dataset({"dataset": {"type": "VOCDetection", "year": "2007", "instance_masks": True}},
                      root=str(root), path="data.train")
    image, target = VOCDetection(str(root), "2007", "trainval")[0]
    model = build_model({"type": "TwoStageDetector", "num_classes": 20,
                         "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c4"]},
                         "rpn": {"type": "RPNHead", "anchor_sizes": [[16, 32]]},
                         "roi_head": {"type": "RoIHead", "box_head": {"type": "TwoMLPHead", "fc_dim": 8}},
                         "mask_head": {"type": "MaskRoIHead", "conv_dim": 8, "num_conv": 1}})
    with pytest.raises(ValueError, match="no 'masks'.*VOC detection has none"):
        model([image], [target])
