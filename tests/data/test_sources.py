"""``--data``: the format and the splits of a path; ``data.image_size``; the class count from data."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detkit.config import ConfigError, load_config
from detkit.data import build_dataset
from detkit.data.classes import resolve_num_classes
from detkit.data.sources import apply_data_source, find_data_source
from detkit.errors import DatasetError

REPO = Path(__file__).resolve().parents[2]


def _jpg(path: Path, h: int = 30, w: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def voc_folder(root: Path, names=("horse", "cat")) -> Path:
    """A VOC-style folder (no year) with trainval / test lists and one object per xml."""
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for split, stems in (("trainval", ["a", "b"]), ("test", ["c"])):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for k, stem in enumerate(stems):
            _jpg(root / "JPEGImages" / f"{stem}.jpg")
            name = names[(k + len(stem)) % len(names)] if stem != "a" else names[0]
            (root / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><size><width>40</width><height>30</height></size><object><name>{name}"
                f"</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>25</ymax></bndbox>"
                f"</object></annotation>")
    return root


def test_voc_folder_classes_from_the_xml_and_the_standard_splits(tmp_path):
    source = find_data_source(voc_folder(tmp_path / "voc"))
    assert source.format == "voc"
    train, val = source.splits["train"], source.splits["val"]
    assert (train["split"], val["split"]) == ("trainval", "test")
    assert train["class_names"] == ["cat", "horse"]          # sorted, as the 20 VOC names are
    dataset = build_dataset({"dataset": train})
    assert len(dataset) == 2 and dataset.class_names == ["cat", "horse"]


def test_yolo_folder_with_classes_txt_and_roboflow_coco_export(tmp_path):
    yolo = tmp_path / "yolo"
    for split in ("train", "valid"):
        _jpg(yolo / split / "images" / "0.jpg")
        (yolo / split / "labels").mkdir(parents=True)
        (yolo / split / "labels" / "0.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match="classes.txt"):
        find_data_source(yolo)
    (yolo / "classes.txt").write_text("ant\nbee\n")
    source = find_data_source(yolo)
    assert source.format == "yolo" and source.splits["val"]["img_dir"] == str(yolo / "valid" / "images")
    assert build_dataset({"dataset": source.splits["val"]}).records[0].labels.tolist() == [1]

    rf = tmp_path / "roboflow"
    for split in ("train", "valid", "test"):
        _jpg(rf / split / "x.jpg")
        (rf / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 0, "file_name": "x.jpg", "height": 30, "width": 40}],
            "annotations": [], "categories": [{"id": 0, "name": "objects"}, {"id": 1, "name": "fish"}]}))
    source = find_data_source(rf)
    assert source.format == "coco"
    assert source.splits["val"]["ann_file"] == str(rf / "valid" / "_annotations.coco.json")


def test_a_data_yaml_without_val_evaluates_on_train_and_keeps_the_mosaic(tmp_path, capsys):
    _jpg(tmp_path / "d" / "images" / "train" / "0.jpg")
    (tmp_path / "d" / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": ["a"]}))
    cfg = load_config(REPO / "configs/yolo/yolov3_d53_coco.yaml")
    out = apply_data_source(cfg, tmp_path / "d")
    assert "no val split" in capsys.readouterr().err
    mosaic = out["data"]["train"]["dataset"]
    assert mosaic["type"] == "Mosaic" and mosaic["dataset"]["type"] == "YoloDetection"
    assert mosaic["dataset"]["filter_empty"] is True                    # kept from the config
    assert out["data"]["val"]["dataset"]["split"] == "train"
    assert out["model"]["num_classes"] is None and cfg["model"]["num_classes"] == 80   # a copy


def test_image_size_is_one_key():
    cfg = load_config(REPO / "configs/faster_rcnn/faster_rcnn_r50_fpn_coco.yaml", ["data.image_size=400"])
    train, val = cfg["data"]["train"]["pipeline"][0], cfg["data"]["val"]["pipeline"][0]
    assert train["short_edge"] == [320, 336, 352, 368, 384, 400] and train["max_size"] == 666
    assert (val["short_edge"], val["max_size"]) == (400, 666)
    yolo = load_config(REPO / "configs/yolo/yolov3_d53_coco.yaml", ["data.image_size=320"])
    assert yolo["data"]["train"]["dataset"]["size"] == 320                 # Mosaic
    assert yolo["data"]["train"]["pipeline"][0]["size"] == 320
    assert yolo["data"]["val"]["pipeline"][0]["size"] == 320
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(REPO / "configs/yolo/yolov3_d53_coco.yaml", ["data.image_size=big"])


def test_num_classes_null_in_a_config_file_is_taken_from_the_data(tmp_path):
    """Without --data too: ``num_classes: null`` + COCO json -> its category count."""
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}))
    cfg = {"model": {"type": "OneStageDetector", "num_classes": None},
           "data": {"root": str(tmp_path), "train": {"dataset": {"type": "CocoDetection", "img_dir": ".",
                                                                "ann_file": "ann.json"}}}}
    assert resolve_num_classes(cfg)["model"]["num_classes"] == 2
    cfg["model"]["num_classes"] = 3
    with pytest.raises(ConfigError, match=r"num_classes is 3 but the data has 2 classes \(a, b\)"):
        resolve_num_classes(cfg)
    assert resolve_num_classes(cfg, check=False)["model"]["num_classes"] == 3
    cfg["model"]["num_classes"] = None
    cfg["data"]["train"]["dataset"]["ann_file"] = "missing.json"
    with pytest.raises(ConfigError, match="num_classes is not set.*missing.json"):
        resolve_num_classes(cfg)


def test_data_keeps_the_dataset_options_of_the_config(tmp_path):
    """Mask R-CNN's ``instance_masks: true`` survives ``--data`` (else it trains without masks)."""
    root = tmp_path / "coco"
    for split in ("train", "val"):
        _jpg(root / split / "0.jpg")
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    cfg = apply_data_source(load_config(REPO / "configs/mask_rcnn/mask_rcnn_r50_fpn_coco.yaml"), root)
    train = cfg["data"]["train"]["dataset"]
    assert train["instance_masks"] is True and train["ann_file"].endswith("instances_train.json")
    assert resolve_num_classes(cfg)["model"]["num_classes"] == 1
