"""Fine-tuning inputs: backbone weights from a pre-training checkpoint, and ``data.train.subset``."""

import copy

import pytest
import torch
from ssl_helpers import R18, TINY_DARKNET

from detkit.data import build_dataset
from detkit.data.subset import subset_indices
from detkit.models import build_model
from detkit.registry import ConfigError
from detkit.ssl import build_method

CENTERNET = {"type": "OneStageDetector", "num_classes": 4,
             "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c2", "c3", "c4", "c5"]},
             "neck": {"type": "CenterNetUpsample", "in_feature": "c5", "channels": [32, 32, 32],
                      "shortcuts": ["c4", "c3", "c2"]},
             "head": {"type": "CenterNetHead", "in_feature": "p2", "head_channels": 16}}


def save_pretrain_checkpoint(method, path):
    """What tools/pretrain.py writes, reduced to the keys the loader reads."""
    torch.save({"model": method.state_dict(), "iter": 7, "meta": {"ssl": method.checkpoint_meta()}}, path)


@pytest.mark.parametrize("method_type, source", [("MoCoV2", "encoder_q"), ("BYOL", "online"),
                                                 ("DINO", "teacher"), ("SimSiam", "encoder")])
def test_detector_backbone_loads_the_transferred_encoder(tmp_path, capsys, method_type, source):
    extra = {"out_dim": 64, "hidden_dim": 32} if method_type == "DINO" else {}
    method = build_method({"type": method_type, "backbone": dict(R18), **extra})
    with torch.no_grad():   # every parameter different, momentum copies included
        for p in method.parameters():
            p.add_(torch.randn_like(p))
    save_pretrain_checkpoint(method, tmp_path / "last.pth")
    cfg = copy.deepcopy(CENTERNET)
    cfg["backbone"]["weights"] = str(tmp_path / "last.pth")
    detector = build_model(cfg)
    expected = getattr(method, source).backbone.state_dict()
    for key, value in detector.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert f"{len(expected)} tensors of the {method_type}" in capsys.readouterr().out


def test_darknet_backbone_loads_too(tmp_path):
    method = build_method({"type": "SimCLR", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 16})
    save_pretrain_checkpoint(method, tmp_path / "last.pth")
    from detkit.models.backbones import Darknet53
    net = Darknet53(width_mult=0.25, depth_mult=0.33, weights=str(tmp_path / "last.pth"))
    assert torch.equal(net.stage5[0].conv.weight, method.encoder.backbone.stage5[0].conv.weight)


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    darknet = build_method({"type": "SimCLR", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 16})
    save_pretrain_checkpoint(darknet, tmp_path / "darknet.pth")
    cfg = copy.deepcopy(CENTERNET)
    cfg["backbone"]["weights"] = str(tmp_path / "darknet.pth")
    with pytest.raises(ConfigError, match=r"model.backbone.*SimCLR pre-training checkpoint of a Darknet53"):
        build_model(cfg)
    r18 = build_method({"type": "MoCoV2", "backbone": dict(R18), "queue_size": 8})
    save_pretrain_checkpoint(r18, tmp_path / "r18.pth")
    cfg["backbone"].update(depth=34, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(ConfigError, match="missing keys .*layer1.2"):
        build_model(cfg)
    torch.save({"model": {"online.backbone.conv1.weight": torch.zeros(1)}, "iter": 1,
                "meta": {"ssl": {**r18.checkpoint_meta()}}}, tmp_path / "empty.pth")
    cfg["backbone"].update(depth=18, weights=str(tmp_path / "empty.pth"))
    with pytest.raises(ConfigError, match="no tensors under 'encoder_q.backbone."):
        build_model(cfg)


def labeled_split(subset=None, seed=None):
    split = {"dataset": {"type": "CocoDetection", "img_dir": "train",
                         "ann_file": "annotations/instances_train.json"}, "batch_size": 2}
    if subset is not None:
        split["subset"] = subset
    if seed is not None:
        split["subset_seed"] = seed
    return split


def test_subset_is_seeded_and_deterministic(shapes_root):
    full = build_dataset(labeled_split(), root=str(shapes_root))
    ids = [r.image_id for r in full.records]
    first = build_dataset(labeled_split(0.25), root=str(shapes_root))
    again = build_dataset(labeled_split(0.25), root=str(shapes_root))
    other = build_dataset(labeled_split(0.25, seed=1), root=str(shapes_root))
    picked = [r.image_id for r in first.records]
    assert len(picked) == 5 and picked == [r.image_id for r in again.records]
    assert picked == [ids[i] for i in subset_indices(20, 0.25, 0)]
    assert picked == sorted(picked, key=ids.index)                      # original order kept
    assert picked != [r.image_id for r in other.records]
    assert len(build_dataset(labeled_split(0.001), root=str(shapes_root))) == 1     # at least one


@pytest.mark.parametrize("value", [0, 1.5, "10%", True])
def test_bad_subset_values(shapes_root, value):
    with pytest.raises(ConfigError, match=r"data.train.subset: expected a fraction in \(0, 1\]"):
        build_dataset(labeled_split(value), root=str(shapes_root), path="data.train")


def test_subset_can_be_set_from_the_command_line(shapes_root):
    from pathlib import Path

    from detkit.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs/centernet/centernet_r18_shapes.yaml"
    cfg = load_config(path, ["data.train.subset=0.25", f"data.root={shapes_root}"])
    assert len(build_dataset(cfg["data"]["train"], root=cfg["data"]["root"])) == 5
    typo = load_config(path, ["data.train.subsett=0.25"])          # the split builder names it
    with pytest.raises(ConfigError, match="did you mean 'subset'"):
        build_dataset(typo["data"]["train"], root=str(shapes_root), path="data.train")


def test_ssl_weights_into_a_frozen_bn_backbone_get_one_warning(tmp_path):
    from detkit.engine.checkpoint import ssl_weights_in_frozen_bn

    method = build_method({"type": "MoCoV2", "backbone": dict(R18), "queue_size": 8})
    save_pretrain_checkpoint(method, tmp_path / "last.pth")
    cfg = copy.deepcopy(CENTERNET)
    cfg["backbone"]["weights"] = str(tmp_path / "last.pth")
    frozen = copy.deepcopy(cfg)
    frozen["backbone"]["norm"] = "FrozenBN"
    warning = ssl_weights_in_frozen_bn(frozen, build_model(frozen))
    assert warning is not None and "\n" not in warning
    assert f"model.backbone.weights {tmp_path / 'last.pth'} is a MoCoV2 self-supervised" in warning
    assert "--set model.backbone.norm=BN" in warning
    assert ssl_weights_in_frozen_bn(cfg, build_model(cfg)) is None           # BN: nothing to say
    torch.save(method.encoder_q.backbone.state_dict(), tmp_path / "plain.pth")  # not an SSL checkpoint
    frozen["backbone"]["weights"] = str(tmp_path / "plain.pth")
    assert ssl_weights_in_frozen_bn(frozen, build_model(frozen)) is None
