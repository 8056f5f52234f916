"""Loaders: collate, seeded reproducibility (workers, resume), samplers for DDP, grouping."""

import pytest
import torch
from torch.utils.data import DistributedSampler

from detkit.data import build_dataloader, build_dataset, collate, shapes
from detkit.data.loader import GroupedBatchSampler, InferenceSampler

AUGMENT = [{"type": "ResizeShortestEdge", "short_edge": [48, 56, 64], "max_size": 200},
           {"type": "HorizontalFlip", "p": 0.5}, {"type": "RandomBrightnessContrast", "p": 0.8}]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(root, num_train=10, num_val=5, size=64, seed=0)
    return root


def _split(batch_size=3, num_workers=0, **kw):
    return {"dataset": {"type": "CocoDetection", "img_dir": "train",
                        "ann_file": "annotations/instances_train.json"},
            "pipeline": AUGMENT, "batch_size": batch_size, "num_workers": num_workers, **kw}


def _epoch(loader):
    return [(tuple(t["image_id"] for t in targets), [im.clone() for im in images],
             [t["boxes"] for t in targets]) for images, targets in loader]


def _same(a, b):
    if len(a) != len(b):
        return False
    for (ids_a, ims_a, boxes_a), (ids_b, ims_b, boxes_b) in zip(a, b):
        if ids_a != ids_b or any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(ims_a, ims_b)):
            return False
        if any(not torch.equal(x, y) for x, y in zip(boxes_a, boxes_b)):
            return False
    return True


def test_collate():
    images, targets = collate([(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 2), {"a": 2})])
    assert [im.shape[1] for im in images] == [4, 6] and [t["a"] for t in targets] == [1, 2]


def test_same_seed_same_batches_and_augmentations(data_root):
    ds = build_dataset(_split(), root=str(data_root))
    first = _epoch(build_dataloader(_split(), ds, train=True, seed=3))
    again = _epoch(build_dataloader(_split(), ds, train=True, seed=3))
    assert len(first) == 4 and sum(len(ids) for ids, _, _ in first) == 10
    assert sorted(i for ids, _, _ in first for i in ids) == list(range(1, 11))
    assert _same(first, again)
    other = _epoch(build_dataloader(_split(), ds, train=True, seed=4))
    assert not _same(first, other)
    # Two worker processes give the very same samples as the main process.
    workers = _epoch(build_dataloader(_split(num_workers=2), ds, train=True, seed=3))
    assert _same(first, workers)


def test_set_epoch_and_mid_epoch_resume(data_root):
    ds = build_dataset(_split(), root=str(data_root))
    loader = build_dataloader(_split(), ds, train=True, seed=0)
    loader.set_epoch(1)
    epoch1 = _epoch(loader)
    loader.set_epoch(2)
    epoch2 = _epoch(loader)
    assert [ids for ids, _, _ in epoch1] != [ids for ids, _, _ in epoch2]
    resumed = build_dataloader(_split(), ds, train=True, seed=0)
    resumed.set_epoch(1, skip_batches=2)
    assert _same(_epoch(resumed), epoch1[2:])
    assert _same(_epoch(resumed), epoch1)      # the skip applied to one pass only


def test_val_loader_keeps_order(data_root):
    ds = build_dataset(_split(), root=str(data_root))
    loader = build_dataloader(_split(batch_size=4), ds, train=False)
    ids = [i for images, targets in loader for i in (t["image_id"] for t in targets)]
    assert ids == list(range(1, 11)) and len(loader) == 3


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_inference_sampler_sees_every_index_once(n, world):
    shards = [list(InferenceSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_train_shards_have_equal_batch_counts():
    lengths = []
    for rank in range(3):
        sampler = DistributedSampler(range(10), num_replicas=3, rank=rank, shuffle=True, seed=0)
        lengths.append(len(list(GroupedBatchSampler(sampler, 2, seed=0, rank=rank))))
    assert lengths == [2, 2, 2]


def test_aspect_ratio_grouping():
    groups = [0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    batches = list(GroupedBatchSampler(range(11), 2, group_ids=groups))
    indices = [[item[0] for item in b] for b in batches]
    assert sorted(i for b in indices for i in b) == list(range(11)) and len(batches) == 6
    assert all(len({groups[i] for i in b}) == 1 for b in indices[:5])
    assert indices[0] == [0, 2] and indices[1] == [1, 3]
    seeds = [item[1] for b in batches for item in b]
    assert len(set(seeds)) == 11                     # every sample gets its own augmentation seed
    assert len(list(GroupedBatchSampler(range(11), 2, group_ids=groups, drop_last=True))) == 5


def test_distributed_loaders(data_root, monkeypatch):
    """Under a 3-process run: validation shards cover every image once; training shards are equal."""
    import detkit.data.loader as loader_mod

    ds = build_dataset(_split(), root=str(data_root))
    val_ids, train_lengths = [], []
    for rank in range(3):
        monkeypatch.setattr(loader_mod, "dist_info", lambda rank=rank: (rank, 3))
        val = build_dataloader(_split(batch_size=2), ds, train=False)
        val_ids += [t["image_id"] for _, targets in val for t in targets]
        train_lengths.append(len(list(build_dataloader(_split(batch_size=2), ds, train=True))))
    assert sorted(val_ids) == list(range(1, 11))
    assert train_lengths == [2, 2, 2]                 # ceil(10 / 3) = 4 images each, batches of 2


def _first_images(loader, epochs):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.append(next(iter(loader))[0][0])
    return out


@pytest.mark.parametrize("num_workers", [0, 1])
def test_until_epoch_switches_augmentations_off(data_root, num_workers):
    """``until_epoch`` on a pipeline entry and on Mosaic (D-FINE's stop_epoch, close_mosaic): on
    before that epoch, off from it on, also in persistent workers that never see ``set_epoch``."""
    coco = {"type": "CocoDetection", "img_dir": "train", "ann_file": "annotations/instances_train.json"}
    loader_keys = {"batch_size": 5, "num_workers": num_workers, "persistent_workers": True, "shuffle": False}
    plain = build_dataset({"dataset": coco, "pipeline": []}, root=str(data_root))[0][0]
    split = {"dataset": coco, "pipeline": [{"type": "InvertImg", "p": 1.0, "until_epoch": 2}], **loader_keys}
    loader = build_dataloader(split, build_dataset(split, root=str(data_root)), train=True, seed=0)
    images = _first_images(loader, [0, 1, 2, 3])
    assert all(torch.allclose(im, 1 - plain, atol=1e-6) for im in images[:2])   # images in [0, 1]
    assert all(torch.equal(im, plain) for im in images[2:])
    split = {"dataset": {"type": "Mosaic", "size": 96, "until_epoch": 1, "dataset": coco}, "pipeline": [],
             **loader_keys}
    loader = build_dataloader(split, build_dataset(split, root=str(data_root)), train=True, seed=0)
    mosaic, after = _first_images(loader, [0, 1])
    assert mosaic.shape[-2:] == (96, 96) != plain.shape[-2:] and torch.equal(after, plain)


def test_until_epoch_errors():
    from detkit.data.transforms import build_pipeline
    from detkit.registry import ConfigError
    with pytest.raises(ConfigError, match=r"pipeline\.0\.until_epoch"):
        build_pipeline([{"type": "HorizontalFlip", "until_epoch": -1}])
    with pytest.raises(ConfigError, match=r"transforms\.0\.until_epoch"):
        build_pipeline([{"type": "OneOf", "transforms": [{"type": "HorizontalFlip", "until_epoch": 3}]}])
