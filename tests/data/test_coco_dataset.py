"""CocoDetection on a fixture json: sparse ids, crowd boxes, an empty image, invalid boxes."""

import json
import warnings

import cv2
import numpy as np
import pytest
import torch

from detkit.data import CocoDetection, ImageReadError, build_dataset
from detkit.registry import ConfigError


def _write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        img = np.full((h, w, 3), 40, np.uint8)
        img[2:6, 3:9] = (0, 0, 255)            # BGR red: pixels x 3..8, y 2..5 of the first box
        cv2.imwrite(str(folder / name), img)


def _coco_fixture(tmp_path, annotations=None):
    _write_images(tmp_path / "imgs", {"a.png": (20, 30), "b.png": (16, 16), "empty.png": (10, 12)})
    coco = {
        "images": [{"id": 11, "file_name": "a.png", "height": 20, "width": 30},
                   {"id": 5, "file_name": "b.png", "height": 16, "width": 16},
                   {"id": 42, "file_name": "empty.png", "height": 10, "width": 12}],
        "categories": [{"id": 12, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 11, "category_id": 12, "bbox": [3, 2, 6, 4], "area": 24, "iscrowd": 0,
             "segmentation": [[3, 2, 9, 2, 9, 6, 3, 6]]},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [20, 10, 8, 8], "area": 64, "iscrowd": 1,
             "segmentation": [[20, 10, 28, 10, 28, 18, 20, 18]]},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [25, 15, 10, 10], "area": 25, "iscrowd": 0},
            {"id": 4, "image_id": 5, "category_id": 7, "bbox": [4, 4, 0, 3], "area": 0, "iscrowd": 0},
            {"id": 5, "image_id": 5, "category_id": 3, "bbox": [1, 1, float("nan"), 3], "area": 0,
             "iscrowd": 0},
            {"id": 6, "image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 1},
        ]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path


def _load(root, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection("imgs", "ann.json", root=str(root), **kw)
    return ds, [str(w.message) for w in caught]


def test_sparse_ids_crowd_and_empty(tmp_path):
    ds, msgs = _load(_coco_fixture(tmp_path))
    assert ds.label_to_cat_id == [3, 7, 12] and ds.class_names == ["cat", "dog", "zebra"]
    assert [r.image_id for r in ds.records] == [5, 11, 42]
    image, target = ds[1]                         # image 11
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    # xywh -> xyxy; box 3 (25..35) clipped to the 30 px wide image.
    torch.testing.assert_close(target["boxes"], torch.tensor([[3., 2., 9., 6.], [20., 10., 28., 18.],
                                                              [25., 15., 30., 20.]]))
    assert target["labels"].tolist() == [2, 0, 1]
    assert [ds.label_to_cat_id[i] for i in target["labels"]] == [12, 3, 7]
    assert target["iscrowd"].tolist() == [False, True, False]
    assert target["image_id"] == 11 and target["orig_size"].tolist() == [20, 30]
    assert target["scale"].tolist() == [1.0, 1.0] and target["offset"].tolist() == [0.0, 0.0]
    # The red pixels drawn for annotation 1 lie in its box.
    red = (image[0] > 0.9) & (image[1] < 0.1)
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert xs.min() >= 3 and xs.max() < 9 and ys.min() >= 2 and ys.max() < 6
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["labels"].dtype == torch.int64
    # Image 5: the zero-width and NaN boxes are dropped, the crowd box stays.
    _, t5 = ds[0]
    assert t5["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]] and t5["iscrowd"].tolist() == [True]
    assert ds.box_report == {"clipped": 1, "non_finite": 1, "empty": 1}
    assert any("1 boxes clipped" in m and "2 dropped" in m for m in msgs)


def test_filter_empty_and_coco_gt(tmp_path):
    ds, _ = _load(_coco_fixture(tmp_path), filter_empty=True)
    assert [r.image_id for r in ds.records] == [11]          # 5 has only a crowd box, 42 nothing
    gt = ds.coco_gt()
    assert sorted(gt.getCatIds()) == [3, 7, 12] and len(gt.getAnnIds(imgIds=[11])) == 3


def test_semantic_mask_from_polygons(tmp_path):
    ds, _ = _load(_coco_fixture(tmp_path), with_masks=True)
    _, target = ds[1]
    sem = target["sem_seg"]
    assert sem.shape == (20, 30) and sem.dtype == torch.int64
    zebra = torch.nonzero(sem == 3)                           # label 2 (zebra) + 1
    assert 18 <= len(zebra) <= 35                             # the 6x4 polygon, +- its rasterised border
    assert zebra[:, 0].min() >= 2 and zebra[:, 0].max() <= 6 and zebra[:, 1].min() >= 3
    assert (sem == 255).sum() >= 50                           # the 8x8 crowd region is ignore
    assert set(torch.unique(sem).tolist()) <= {0, 3, 255}     # box-only annotation 3 has no mask


def test_unknown_category_names_the_annotation(tmp_path):
    _coco_fixture(tmp_path, annotations=[
        {"id": 77, "image_id": 11, "category_id": 99, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0}])
    with pytest.raises(ValueError, match="annotation id 77.*category_id 99"):
        CocoDetection("imgs", "ann.json", root=str(tmp_path))


def test_bad_image_raises_or_is_skipped(tmp_path):
    root = _coco_fixture(tmp_path)
    (root / "imgs" / "b.png").write_bytes(b"broken")
    ds, _ = _load(root)
    with pytest.raises(ImageReadError, match="b.png"):
        ds[0]
    ds, _ = _load(root, skip_bad_images=True)
    with pytest.warns(UserWarning, match="b.png"):
        _, target = ds[0]
    assert target["image_id"] == 11 and ds.num_skipped == 1


def test_size_mismatch_is_reported(tmp_path):
    root = _coco_fixture(tmp_path)
    cv2.imwrite(str(root / "imgs" / "empty.png"), np.zeros((12, 10, 3), np.uint8))
    ds, _ = _load(root)
    with pytest.raises(ImageReadError, match="empty.png.*12x10.*10x12"):
        ds[2]


def test_build_dataset_from_config(tmp_path):
    root = _coco_fixture(tmp_path)
    split = {"dataset": {"type": "CocoDetection", "img_dir": "imgs", "ann_file": "ann.json"},
             "pipeline": [{"type": "ResizeShortestEdge", "short_edge": 40, "max_size": 100}], "batch_size": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_dataset(split, root=str(root))
    image, target = ds[1]
    assert image.shape == (3, 40, 60)
    torch.testing.assert_close(target["scale"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(target["boxes"][0], torch.tensor([6., 4., 18., 12.]))
    with pytest.raises(ConfigError, match="num_clases|ann_fil"):
        build_dataset({"dataset": {"type": "CocoDetection", "img_dir": "imgs", "ann_fil": "x"}},
                      root=str(root))
    with pytest.raises(ConfigError, match="CocoDetection"):
        build_dataset({"dataset": {"type": "CocoDetectoin", "img_dir": "imgs", "ann_file": "x"}})
    with pytest.raises(ConfigError, match="batch_size"):
        build_dataset(dict(split, batch_sise=3), root=str(root))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_dataset({"dataset": {"type": "CocoDetection", "img_dir": "imgs", "ann_file": "missing.json"}},
                      root=str(root))


def _rotated_jpeg(path):
    """Stored 20 (h) x 40 (w) with a white patch at the stored top-left; EXIF 6 = displayed 40 x 20."""
    from PIL import Image
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:4, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=100, exif=exif)


@pytest.mark.parametrize("frame", ["displayed", "stored"])
def test_exif_rotated_image_boxes_stay_on_their_pixels(tmp_path, frame):
    (tmp_path / "imgs").mkdir()
    _rotated_jpeg(tmp_path / "imgs" / "r.jpg")
    # Displayed (rotated clockwise): the patch is at x 16..20, y 0..8 of a 40 x 20 (h x w) image.
    h, w, box = (40, 20, [16, 0, 4, 8]) if frame == "displayed" else (20, 40, [0, 0, 8, 4])
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "r.jpg", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "patch"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 32, "iscrowd": 0}]}))
    ds = CocoDetection("imgs", "ann.json", root=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, target = ds[0]
    assert image.shape == (3, h, w)
    assert any("stored frame" in str(c.message) for c in caught) == (frame == "stored")
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert image[0, y1:y2, x1:x2].mean() > 0.9
    assert image[0].sum() < 1.2 * image[0, y1:y2, x1:x2].sum()   # nothing bright outside the box
