"""VOCDetection on fixture XMLs: 1-based coordinates, difficult boxes, class errors, 07+12 concat."""


import cv2
import numpy as np
import pytest
import torch

from detkit.data import VOCDetection, build_dataset


def _xml(width, height, objects, with_size=True):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    size = (f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            if with_size else "")
    return f"<annotation><filename>x.jpg</filename>{size}{objs}</annotation>"


def _voc_year(root, year, items, split="trainval"):
    base = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for stem, (h, w), objects in items:
        img = np.full((h, w, 3), 30, np.uint8)
        for _, (x1, y1, x2, y2), _ in objects:   # paint each object's 1-based inclusive pixels
            img[y1 - 1: y2, x1 - 1: x2] = 220
        cv2.imwrite(str(base / "JPEGImages" / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
        (base / "Annotations" / f"{stem}.xml").write_text(_xml(w, h, objects, with_size=stem != "000009"))
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(s for s, _, _ in items) + "\n")


@pytest.fixture
def voc_root(tmp_path):
    _voc_year(tmp_path, 2007, [
        ("000005", (24, 32), [("dog", (1, 1, 10, 8), 0), ("person", (12, 5, 32, 24), 1)]),
        ("000009", (20, 20), [("cat", (3, 4, 6, 9), 0)]),
    ])
    _voc_year(tmp_path, 2012, [("2008_000008", (16, 16), [("bird", (2, 2, 5, 5), 0)])])
    return tmp_path


def test_coordinates_difficult_and_ids(voc_root):
    ds = VOCDetection(str(voc_root), "2007", "trainval")
    assert len(ds) == 2 and len(ds.class_names) == 20 and ds.label_to_cat_id[:2] == [1, 2]
    image, target = ds[0]
    assert target["image_id"] == 5
    # (xmin - 1, ymin - 1, xmax, ymax): 1-based inclusive -> 0-based pixel edges.
    torch.testing.assert_close(target["boxes"], torch.tensor([[0., 0., 10., 8.], [11., 4., 32., 24.]]))
    assert target["labels"].tolist() == [ds.class_names.index("dog"), ds.class_names.index("person")]
    assert target["difficult"].tolist() == [False, True] and target["iscrowd"].tolist() == [False, False]
    # The painted pixels of the dog fill its box exactly.
    bright = image[0] > 0.5
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert bright[y1:y2, x1:x2].float().mean() > 0.95 and not bright[:y2, x2:11].any()
    _, t9 = ds[1]                              # its XML has no <size>: read from the image
    assert t9["orig_size"].tolist() == [20, 20]


def test_coco_gt_marks_difficult_as_crowd(voc_root):
    gt = VOCDetection(str(voc_root), "2007", "trainval").coco_gt()
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[5]))
    assert [a["iscrowd"] for a in anns] == [0, 1]
    assert anns[0]["bbox"] == [0.0, 0.0, 10.0, 8.0] and anns[0]["category_id"] == 12   # dog = label 11


def test_keep_difficult_false_drops_them(voc_root):
    ds = VOCDetection(str(voc_root), "2007", "trainval", keep_difficult=False)
    assert ds.records[0].labels.tolist() == [ds.class_names.index("dog")]


def test_unknown_class_names_the_file(voc_root):
    xml = voc_root / "VOC2007" / "Annotations" / "000009.xml"
    xml.write_text(_xml(20, 20, [("unicorn", (1, 1, 3, 3), 0)]))
    with pytest.raises(ValueError, match="000009.xml.*unicorn"):
        VOCDetection(str(voc_root), "2007", "trainval")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        VOCDetection(str(voc_root), "2007", "test")


def test_concat_07_12_from_config(voc_root):
    split = {"dataset": {"type": "ConcatDataset", "datasets": [
        {"type": "VOCDetection", "year": "2007", "split": "trainval"},
        {"type": "VOCDetection", "year": "2012", "split": "trainval"}]},
        "pipeline": [{"type": "HorizontalFlip", "p": 1.0}], "batch_size": 2}
    ds = build_dataset(split, root=str(voc_root))
    assert len(ds) == 3 and ds.class_names[0] == "aeroplane"
    _, target = ds[2]
    assert target["image_id"] == 2008000008
    torch.testing.assert_close(target["boxes"], torch.tensor([[11., 1., 15., 5.]]))   # flipped in 16 px
    assert target["scale"][0] < 0                    # the flip is recorded as a negative x scale
    gt = ds.coco_gt()
    assert sorted(gt.getImgIds()) == [5, 9, 2008000008] and len(gt.getAnnIds()) == 4
    assert ds.get_raw(2)["image_id"] == 2008000008 and len(ds.aspect_ratios()) == 3
