"""Segmentation: one ignore key (data.ignore_index) reaching head, evaluator, dataset and padding;
images without masks counted; sparse mask ids through mask_values."""

import cv2
import numpy as np
import pytest

from detkit.config import ConfigError, load_config
from detkit.data import SemanticSegDataset, build_dataset
from detkit.errors import DatasetError

CONFIG = "configs/segmentation/seg_r18_shapes.yaml"


def test_data_ignore_index_reaches_head_evaluator_and_datasets(tmp_path):
    cfg = load_config(CONFIG, ["data.ignore_index=254"])
    assert cfg["model"]["head"]["ignore_index"] == 254
    assert cfg["evaluation"]["ignore_index"] == 254
    for split in ("train", "val"):
        assert cfg["data"][split]["dataset"]["ignore_index"] == 254
    assert load_config(CONFIG)["model"]["head"]["ignore_index"] == 255

    from detkit.models import build_model
    assert build_model(cfg["model"]).head.ignore_index == 254

    (tmp_path / "p.yaml").write_text(
        "data:\n  ignore_index: 0\n  train:\n    pipeline:\n      - {type: PadToMultiple, divisor: 32}\n")
    padded = load_config(tmp_path / "p.yaml")
    assert padded["data"]["train"]["pipeline"][0]["mask_pad_value"] == 0


def test_conflicting_ignore_value_is_an_error():
    with pytest.raises(ConfigError, match=r"evaluation\.ignore_index is 255 but data\.ignore_index is 254"):
        load_config(CONFIG, ["data.ignore_index=254", "evaluation.ignore_index=255"])
    with pytest.raises(ConfigError, match="0..255"):
        load_config(CONFIG, ["data.ignore_index=-1"])


def _seg_folder(root, masks):
    (root / "img").mkdir()
    (root / "mask").mkdir()
    for i in range(3):
        cv2.imwrite(str(root / "img" / f"{i}.jpg"), np.zeros((4, 6, 3), np.uint8))
    for i, mask in masks.items():
        cv2.imwrite(str(root / "mask" / f"{i}.png"), mask)


def test_missing_masks_warning_and_sparse_ids(tmp_path):
    mask = np.array([[0, 7, 200, 13, 255, 7]] * 4, np.uint8)
    _seg_folder(tmp_path, {0: mask})
    with pytest.warns(UserWarning, match=r"2 of 3 images .* have no mask \.png .* 1\.jpg, 2\.jpg"):
        ds = SemanticSegDataset("img", "mask", ["bg", "a", "b"], root=str(tmp_path), mask_values=[0, 7, 200])
    assert len(ds) == 1
    assert ds[0][1]["sem_seg"][0].tolist() == [0, 1, 2, 255, 255, 1]   # 13 is not listed: ignored
    plain = SemanticSegDataset("img", "mask", [f"c{i}" for i in range(201)], root=str(tmp_path))
    assert plain[0][1]["sem_seg"][0].tolist() == [0, 7, 200, 13, 255, 7]
    with pytest.raises(DatasetError, match=r"0\.png.*mask values \[7, 13, 200\].*mask_values"):
        SemanticSegDataset("img", "mask", ["bg", "a", "b"], root=str(tmp_path))[0]
    split = {"dataset": {"type": "SemanticSegDataset", "img_dir": "img", "mask_dir": "mask",
                         "class_names": ["bg", "a", "b"], "mask_values": [0, 7, 200], "ignore_index": 254}}
    ds = build_dataset(split, root=str(tmp_path))
    assert ds[0][1]["sem_seg"][0].tolist() == [0, 1, 2, 254, 254, 1]
