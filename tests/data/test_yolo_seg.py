"""YoloDetection (normalised txt labels, missing / orphan label files) and SemanticSegDataset."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detkit.data import SemanticSegDataset, YoloDetection, build_dataset, shapes


@pytest.fixture
def yolo_root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((20, 40, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "images" / "b.jpg"), np.zeros((10, 10, 3), np.uint8))   # no label file
    # cx cy w h normalised: box x 10..30 (of 40), y 5..15 (of 20); a polygon line; a box over the edge.
    (tmp_path / "labels" / "a.txt").write_text(
        "1 0.5 0.5 0.5 0.5\n\n0 0.1 0.1 0.2 0.1 0.2 0.3\n1 0.95 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "c.txt").write_text("0 0.5 0.5 0.1 0.1\n")                 # no image
    return tmp_path


def test_boxes_missing_and_orphan_labels(yolo_root):
    with pytest.warns(UserWarning) as record:
        ds = YoloDetection("images", "labels", ["cat", "dog"], root=str(yolo_root))
    messages = " ".join(str(w.message) for w in record)
    assert "c.txt" in messages and "1 label files have no image" in messages
    assert "1 boxes clipped" in messages
    assert len(ds) == 2 and ds.label_to_cat_id == [1, 2]
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[10., 5., 30., 15.], [4., 2., 8., 6.],
                                                              [34., 8., 40., 12.]]))
    assert target["labels"].tolist() == [1, 0, 1]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["orig_size"].tolist() == [10, 10]


def test_class_out_of_range_names_file_and_line(yolo_root):
    (yolo_root / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"a\.txt:2.*class index 2"):
        YoloDetection("images", "labels", ["cat", "dog"], root=str(yolo_root))
    (yolo_root / "labels" / "a.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(ValueError, match=r"a\.txt:1"):
        YoloDetection("images", "labels", ["cat", "dog"], root=str(yolo_root))


def test_yolo_exif_rotated_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:4, :8] = 255                         # top-left of the stored picture
    exif = Image.Exif()
    exif[0x0112] = 6                             # displayed rotated clockwise: 40 high, 20 wide
    Image.fromarray(stored).save(tmp_path / "images" / "r.jpg", quality=100, exif=exif)
    # The label is made on the displayed picture, where the white patch is at the top right.
    (tmp_path / "labels" / "r.txt").write_text("0 0.9 0.1 0.2 0.2\n")
    image, target = YoloDetection("images", "labels", ["patch"], root=str(tmp_path))[0]
    assert image.shape == (3, 40, 20)
    torch.testing.assert_close(target["boxes"], torch.tensor([[16., 0., 20., 8.]]))
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert image[0, y1:y2, x1:x2].mean() > 0.9 and image[0].sum() < image[0, y1:y2, x1:x2].sum() * 1.2


def _palette_png(path, array):
    im = Image.fromarray(array.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (253 * 3))
    im.save(path)


def test_semantic_seg_palette_masks(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    mask = np.zeros((12, 16), np.uint8)
    mask[2:6, 3:9] = 1
    mask[8:, :] = 2
    mask[0, 0] = 255
    cv2.imwrite(str(tmp_path / "JPEGImages" / "x.jpg"), np.zeros((12, 16, 3), np.uint8))
    _palette_png(tmp_path / "SegmentationClass" / "x.png", mask)
    (tmp_path / "train.txt").write_text("x\n")
    split = {"dataset": {"type": "SemanticSegDataset", "img_dir": "JPEGImages",
                         "mask_dir": "SegmentationClass",
                         "class_names": ["background", "a", "b"], "split_file": "train.txt"},
             "pipeline": [{"type": "Letterbox", "size": 32}], "batch_size": 1}
    ds = build_dataset(split, root=str(tmp_path))
    image, target = ds[0]
    assert image.shape == (3, 32, 32) and target["boxes"].shape == (0, 4)
    sem = target["sem_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (32, 32)
    # Scale 2, vertical padding (32 - 24) / 2 = 4 rows of ignore at top and bottom.
    assert (sem[:4] == 255).all() and (sem[-4:] == 255).all()
    torch.testing.assert_close(target["offset"], torch.tensor([0.0, 4.0]))
    expected = np.kron(mask, np.ones((2, 2), np.uint8))
    np.testing.assert_array_equal(sem[4:28].numpy(), expected)
    _palette_png(tmp_path / "SegmentationClass" / "x.png", np.full((12, 16), 7))
    with pytest.raises(ValueError, match="x.png.*7"):
        ds[0]


def test_semantic_seg_on_shapes_masks(tmp_path):
    shapes.generate(tmp_path, num_train=2, num_val=1, size=64, seed=1)
    ds = SemanticSegDataset("train", "masks/train", ["background", *shapes.CLASS_NAMES], root=str(tmp_path))
    assert len(ds) == 2 and ds.seg_class_names[1] == "circle"
    image, target = ds[0]
    assert image.shape == (3, 64, 64)
    assert set(torch.unique(target["sem_seg"]).tolist()) <= {0, 1, 2, 3, 4, 255}
