"""YoloDetection from an Ultralytics data.yaml: names as a list or {id: name}, folders or .txt
lists, background images counted, orphan labels warned once, config-built."""

import warnings

import cv2
import numpy as np
import pytest
import torch
import yaml

from detkit.data import YoloDetection, build_dataset
from detkit.errors import DatasetError


def _dataset(root, names):
    """train: a.jpg (one box), b.jpg (no label file: background), orphan label c.txt; val: v.jpg."""
    for split in ("train", "val"):
        (root / "ds" / "images" / split).mkdir(parents=True)
        (root / "ds" / "labels" / split).mkdir(parents=True)
    cv2.imwrite(str(root / "ds/images/train/a.jpg"), np.zeros((20, 40, 3), np.uint8))
    cv2.imwrite(str(root / "ds/images/train/b.jpg"), np.zeros((10, 10, 3), np.uint8))
    cv2.imwrite(str(root / "ds/images/val/v.jpg"), np.zeros((10, 20, 3), np.uint8))
    (root / "ds/labels/train/a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "ds/labels/train/c.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "ds/labels/val/v.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    # Like Ultralytics' own files: `path` relative (here: to the yaml's folder), splits under it.
    (root / "conf").mkdir()
    data_yaml = root / "conf" / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": "../ds", "train": "images/train", "val": "images/val",
                                         "names": names}, sort_keys=False))
    return data_yaml


@pytest.mark.parametrize("names", [["cat", "dog"], {0: "cat", 1: "dog"}, {1: "dog", 0: "cat"}])
def test_names_list_or_dict(tmp_path, names, capsys):
    data_yaml = _dataset(tmp_path, names)
    with pytest.warns(UserWarning, match=r"1 label files have no image.*c\.txt"):
        ds = YoloDetection(data_yaml=str(data_yaml), split="train")
    assert ds.class_names == ["cat", "dog"] and ds.label_to_cat_id == [1, 2]
    assert [r.file.name for r in ds.records] == ["a.jpg", "b.jpg"] and ds.num_background == 1
    assert "2 images, 1 without a label file (background images" in capsys.readouterr().err
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[10., 5., 30., 15.]]))
    assert target["labels"].tolist() == [1]
    assert ds[1][1]["boxes"].shape == (0, 4)
    val = YoloDetection(data_yaml=str(data_yaml), split="val")
    assert [r.file.name for r in val.records] == ["v.jpg"] and val.records[0].labels.tolist() == [0]


def test_warned_once_and_built_from_config(tmp_path, capsys):
    data_yaml = _dataset(tmp_path, ["cat", "dog"])
    split = {"dataset": {"type": "YoloDetection", "data_yaml": "conf/data.yaml", "split": "train"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = build_dataset(split, root=str(tmp_path))
        build_dataset(split, root=str(tmp_path))          # e.g. built again for class names
    assert len(first) == 2 and first.class_names == ["cat", "dog"]
    orphan = [w for w in caught if "have no image" in str(w.message)]
    assert len(orphan) == 1
    assert orphan[0].filename == __file__                  # attributed to the caller, not the registry
    assert capsys.readouterr().err.count("without a label file") == 1
    assert data_yaml.is_file()


def test_txt_list_and_list_of_sources(tmp_path):
    data_yaml = _dataset(tmp_path, ["cat", "dog"])
    (tmp_path / "ds" / "train.txt").write_text("images/train/a.jpg\n\n")
    cfg = yaml.safe_load(data_yaml.read_text())
    data_yaml.write_text(yaml.safe_dump(dict(cfg, train="train.txt", test=["images/train", "images/val"])))
    assert [r.file.name for r in YoloDetection(data_yaml=str(data_yaml)).records] == ["a.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = YoloDetection(data_yaml=str(data_yaml), split="test")
    assert sorted(r.file.name for r in both.records) == ["a.jpg", "b.jpg", "v.jpg"]


def test_data_yaml_errors_name_the_file(tmp_path):
    data_yaml = _dataset(tmp_path, {0: "cat", 2: "dog"})
    with pytest.raises(DatasetError, match=r"data\.yaml.*ids must be 0\.\.1 without gaps"):
        YoloDetection(data_yaml=str(data_yaml))
    data_yaml.write_text(yaml.safe_dump({"path": "../ds", "train": "images/train", "names": ["a"]}))
    with pytest.raises(DatasetError, match=r"data\.yaml: no 'val' entry \(it has: train\)"):
        YoloDetection(data_yaml=str(data_yaml), split="val")
    data_yaml.write_text(yaml.safe_dump({"train": "images/train", "nc": 3, "names": ["a", "b"]}))
    with pytest.raises(DatasetError, match=r"nc is 3 but 'names' has 2 entries"):
        YoloDetection(data_yaml=str(data_yaml))
    with pytest.raises(DatasetError, match=r"data_yaml not found: .*absent\.yaml"):
        YoloDetection(data_yaml=str(tmp_path / "absent.yaml"))
