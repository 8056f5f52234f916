"""Unlabeled image folders, view augmentations, and the multi-view samples the methods take."""

import warnings

import numpy as np
import pytest
import torch
from ssl_helpers import make_folder, pretrain_config

from detkit.data import ImageReadError, build_dataloader, build_dataset
from detkit.registry import ConfigError
from detkit.ssl import build_views


def split(tmp_path, **views):
    cfg = pretrain_config(tmp_path, {}, local=views.pop("local", 0))
    return cfg["data"]["train"]


def test_image_folder_is_recursive_and_views_have_the_configured_sizes(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = build_dataset(split(tmp_path, local=3), root=str(tmp_path), path="data.train")
    assert len(dataset) == 8                                   # txt ignored, sub-folders searched
    images, target = dataset[0]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert target["local_views"].shape == (3, 3, 16, 16)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_views_are_seeded_and_differ_between_views(tmp_path):
    make_folder(tmp_path)
    cfg = split(tmp_path)
    loader = build_dataloader(cfg, build_dataset(cfg, root=str(tmp_path)), train=True, seed=3)
    first = next(iter(loader))[0]
    again = next(iter(loader))[0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))     # same seed, epoch -> same views
    assert not torch.equal(first[0][0], first[0][1])                 # two different views of one image


def test_bad_files_are_reported_or_skipped(tmp_path):
    make_folder(tmp_path, count=3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    cfg = split(tmp_path)
    dataset = build_dataset(cfg, root=str(tmp_path))
    index = [str(f) for f in dataset.dataset.files].index(str(tmp_path / "broken.png"))
    with pytest.raises(ImageReadError, match="broken.png"):
        dataset[index]
    cfg["dataset"]["source"]["skip_bad_images"] = True
    dataset = build_dataset(cfg, root=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, _ = dataset[index]
    assert images.shape[0] == 2 and dataset.dataset.num_skipped == 1
    assert any("broken.png" in str(w.message) for w in caught)


def test_labels_of_a_detection_dataset_are_ignored(shapes_root):
    cfg = {"dataset": {"type": "MultiViewDataset",
                       "source": {"type": "CocoDetection", "img_dir": "train",
                                  "ann_file": "annotations/instances_train.json"},
                       "views": [{"count": 2, "size": 24}]}, "batch_size": 2}
    images, target = build_dataset(cfg, root=str(shapes_root))[1]
    assert images.shape == (2, 3, 24, 24) and set(target) == {"image_id"}


@pytest.mark.parametrize("views, match", [
    ([], "non-empty list"),
    ([{"count": 1, "size": 32}], "two or more views"),
    ([{"count": 2, "size": 32, "scale": [0.5, 2.0]}], "scale"),
    ([{"count": 2, "size": 32, "transforms": [{"type": "Solarise"}]}], "did you mean 'Solarize'"),
    ([{"count": 2, "size": 32}, {"count": 1, "size": 16}, {"count": 1, "size": 8}], "two sizes"),
])
def test_bad_view_configs_name_the_problem(views, match):
    with pytest.raises(ConfigError, match=match):
        build_views(views, "data.train.dataset.views")


def test_solarize_and_blur_views_from_config():
    views = build_views([{"count": 2, "size": 16, "transforms": [
        {"type": "Solarize", "threshold_range": [0.5, 0.5], "p": 1.0},
        {"type": "GaussianBlur", "sigma_limit": [0.1, 2.0], "p": 1.0},
        {"type": "ToGray", "p": 1.0}]}])
    views.set_seed(0)
    image = np.full((20, 20, 3), 250, np.uint8)
    global_views, local_views = views(image)
    assert len(global_views) == 2 and not local_views
    assert global_views[0].max() <= 6                 # 250 solarised -> 5 (gray keeps it)


def test_knn_vote_against_a_written_out_count():
    import math

    from detkit.ssl.knn import knn_predict

    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.2]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[1.0, 0.05], [0.3, 1.0], [-1.0, 0.0]])
    got = knn_predict(bank, labels, queries, num_classes=3, k=3, temperature=0.5)
    expected = []
    for q in queries.tolist():
        sims = [sum(a * b for a, b in zip(q, x)) / math.hypot(*q) / math.hypot(*x) for x in bank.tolist()]
        nearest = sorted(range(5), key=lambda i: -sims[i])[:3]
        votes = [sum(math.exp(sims[i] / 0.5) for i in nearest if labels[i] == c) for c in range(3)]
        expected.append(votes.index(max(votes)))
    assert got.tolist() == expected == [0, 1, 2]


def test_object_crops_of_a_detection_dataset(shapes_root):
    from detkit.ssl.knn import object_crops

    dataset = build_dataset({"dataset": {"type": "CocoDetection", "img_dir": "train",
                                         "ann_file": "annotations/instances_train.json"}, "batch_size": 1},
                            root=str(shapes_root))
    crops, labels = object_crops(dataset, 24, limit=3)
    assert crops.shape == (sum(len(r.boxes) for r in dataset.records[:3]), 3, 24, 24)
    assert labels.tolist() == [int(x) for r in dataset.records[:3] for x in r.labels]
