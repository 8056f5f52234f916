"""Faster R-CNN end to end: parity with torchvision's fasterrcnn_resnet50_fpn after weight
conversion (detections, RPN proposals, training losses), the config option and CLI that load
torchvision weights, other backbones (Darknet-FPN, ResNet-C4), empty images."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from detkit.config import load_config
from detkit.models import build_model
from detkit.models.convert import COCO_CATEGORY_IDS, torchvision_to_detkit

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "faster_rcnn"
SIZES = [(256, 320), (224, 288)]  # two sizes: padding and per-image clipping are exercised


@pytest.fixture(scope="module")
def r50_pair(tmp_path_factory):
    """torchvision's random-init model (no resizing) and detkit's COCO config loading its weights."""
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0)
    with torch.no_grad():  # milder class logits: fewer tied (saturated) scores to order
        tv.roi_heads.box_predictor.cls_score.weight.mul_(0.1)
    tv.transform.resize = lambda image, target=None: (image, target)  # images are pre-sized
    path = tmp_path_factory.mktemp("tv") / "fasterrcnn_r50_fpn.pth"
    torch.save(tv.state_dict(), path)
    cfg = load_config(CONFIGS / "faster_rcnn_r50_fpn_coco.yaml", [
        "model.backbone.weights=null", "model.num_classes=90", "model.roi_head.score_thresh=0.0",
        f"model.init_from_torchvision={path}"])
    model = build_model(cfg["model"])
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=g) for h, w in SIZES]
    return tv.eval(), model.eval(), images, path


@pytest.mark.slow
def test_r50_fpn_detections_and_proposals_equal_torchvision(r50_pair):
    tv, model, images, _ = r50_pair
    tv_proposals, proposals = [], []  # captured on the way: RPN output, RoI head input
    hooks = [tv.rpn.register_forward_hook(lambda mod, args, out: tv_proposals.extend(out[0])),
             model.roi_head.register_forward_pre_hook(lambda mod, args: proposals.extend(args[1]))]
    try:
        with torch.no_grad():
            expected, got = tv(images), model(images)
    finally:
        for h in hooks:
            h.remove()
    for exp, res in zip(tv_proposals, proposals):
        assert res.shape == exp.shape and res.shape[0] > 100
        assert (res - exp).abs().max() < 1e-3
    for exp, res in zip(expected, got):
        assert res["boxes"].shape == exp["boxes"].shape == (100, 4)
        assert (res["boxes"] - exp["boxes"]).abs().max() < 1e-3
        assert (res["scores"] - exp["scores"]).abs().max() < 1e-4
        assert torch.equal(res["labels"], exp["labels"] - 1)  # torchvision's 0 is background


@pytest.mark.slow
def test_r50_fpn_training_losses_equal_torchvision(r50_pair):
    tv, model, images, _ = r50_pair
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0], [150.0, 30.0, 300.0, 200.0]]),
                "labels": torch.tensor([0, 16])},
               {"boxes": torch.tensor([[50.0, 60.0, 90.0, 100.0]]), "labels": torch.tensor([3])}]
    tv_targets = [dict(t, labels=t["labels"] + 1) for t in targets]
    # Both models use BN statistics (torchvision's random model has BatchNorm2d, detkit's COCO
    # config FrozenBN): keep torchvision's BN layers in eval mode while training.
    tv.train()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model.train()
    try:
        torch.manual_seed(11)
        expected = tv(images, tv_targets)
        torch.manual_seed(11)  # same draws: torchvision's random train size is patched out with resize
        got = model(images, targets)
    finally:
        tv.eval(), model.eval()
    pairs = {"loss_rpn_cls": "loss_objectness", "loss_rpn_box": "loss_rpn_box_reg",
             "loss_cls": "loss_classifier", "loss_box": "loss_box_reg"}
    assert set(got) == set(pairs)
    for ours, theirs in pairs.items():
        assert abs(got[ours].item() - expected[theirs].item()) < 1e-4, (ours, got[ours], expected[theirs])
        assert got[ours].item() > 0


def test_convert_predictor_rows_and_errors():
    state = {"roi_heads.box_predictor.cls_score.weight": torch.arange(91.0)[:, None].repeat(1, 2),
             "roi_heads.box_predictor.cls_score.bias": torch.arange(91.0),
             "roi_heads.box_predictor.bbox_pred.weight": torch.arange(91.0 * 4)[:, None],
             "roi_heads.box_predictor.bbox_pred.bias": torch.arange(91.0 * 4)}
    out = torchvision_to_detkit(state, class_ids=COCO_CATEGORY_IDS)
    assert out["roi_head.cls_score.bias"].tolist() == [float(i) for i in COCO_CATEGORY_IDS] + [0.0]
    assert out["roi_head.bbox_pred.bias"][:8].tolist() == [4.0, 5, 6, 7, 8, 9, 10, 11]
    assert out["roi_head.bbox_pred.bias"][-4:].tolist() == [360.0, 361, 362, 363]  # class 90
    assert len(COCO_CATEGORY_IDS) == 80 and 12 not in COCO_CATEGORY_IDS
    with pytest.raises(ValueError, match="no detkit counterpart"):
        torchvision_to_detkit(dict(state, **{"roi_heads.mask_head.0.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unsupported arch"):
        torchvision_to_detkit(state, arch="keypointrcnn_resnet50_fpn")
    renamed = torchvision_to_detkit(dict(state, **{"backbone.fpn.inner_blocks.2.0.weight": torch.ones(1),
                                                   "rpn.head.conv.0.0.bias": torch.ones(1)}))
    assert "neck.lateral_convs.2.weight" in renamed and "rpn.conv.0.bias" in renamed


@pytest.mark.slow
def test_convert_weights_cli(r50_pair, tmp_path):
    import importlib.util

    _, model, _, path = r50_pair
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "detkit.pth"
    assert cli.main([str(path), str(out)]) == 0
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["anchor_stride_mode"] == "torchvision"  # read by tools/eval.py and Predictor
    state = ckpt["model"]
    own = model.state_dict()
    assert torch.equal(state["roi_head.box_head.fc7.weight"], own["roi_head.box_head.fc7.weight"])
    assert set(own) - set(state) <= {k for k in own if k.endswith("num_batches_tracked")}


def _tiny_targets():
    return [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0], [60.0, 20.0, 120.0, 90.0]]),
             "labels": torch.tensor([0, 2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


TINY_RPN = {"pre_nms_topk_train": 200, "post_nms_topk_train": 100, "pre_nms_topk_test": 100,
            "post_nms_topk_test": 50}
TINY_HEADS = {"roi_head": {"type": "RoIHead", "batch_size_per_image": 32,
                           "box_head": {"type": "TwoMLPHead", "fc_dim": 32}}}


@pytest.mark.parametrize("variant", ["darknet_fpn", "resnet_c4"])
def test_other_backbones_train_and_predict(variant):
    if variant == "darknet_fpn":
        parts = {"backbone": {"type": "Darknet53", "width_mult": 0.25, "depth_mult": 0.33},
                 "neck": {"type": "FPN", "out_channels": 32, "extra_levels": "maxpool"},
                 "rpn": {"type": "RPNHead", "anchor_sizes": [[16], [32], [64], [128]], **TINY_RPN},
                 **TINY_HEADS}
    else:
        parts = {"backbone": {"type": "ResNet", "depth": 18, "out_features": ["c4"]},
                 "rpn": {"type": "RPNHead", "anchor_sizes": [[16, 32, 64]], **TINY_RPN},
                 "roi_head": {"type": "RoIHead", "batch_size_per_image": 8, "pooler_resolution": 14,
                              "box_head": {"type": "Res5Head", "depth": 18}}}
    torch.manual_seed(0)
    model = build_model({"type": "TwoStageDetector", "num_classes": 3, **parts})
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    if variant == "resnet_c4":  # res5 on every RoI is costly: few RoIs
        model.rpn.post_nms_topk[False] = 10
    losses = model(images, _tiny_targets())
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        results = model(images)
    assert len(results) == 2 and all(r["boxes"].shape[1] == 4 for r in results)


def test_empty_images_give_finite_losses_and_zero_box_losses():
    torch.manual_seed(0)
    model = build_model({"type": "TwoStageDetector", "num_classes": 3,
                         "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c4"]},
                         "rpn": {"type": "RPNHead", "anchor_sizes": [[16, 32, 64]], **TINY_RPN},
                         **TINY_HEADS})
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model([torch.rand(3, 64, 96)] * 2, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_box"].item() == 0.0 and losses["loss_box"].item() == 0.0
    assert losses["loss_rpn_cls"].item() > 0 and losses["loss_cls"].item() > 0


@pytest.mark.parametrize("name", ["r50_fpn_coco", "r50_fpn_voc", "r50_dcn_fpn_coco", "r50_dc5_coco",
                                  "r50_c4_coco", "r18_fpn_shapes"])
def test_configs_build(name):
    overrides = ["model.backbone.weights=null", "model.backbone.depth=18"]
    if "c4" in name:
        overrides += ["model.roi_head.box_head.weights=null", "model.roi_head.box_head.depth=18"]
    cfg = load_config(CONFIGS / f"faster_rcnn_{name}.yaml", overrides)
    model = build_model(cfg["model"])
    assert model.roi_head.num_classes == {"voc": 20, "coco": 80, "shapes": 4}[name.split("_")[-1]]
    if "dcn" in name:
        assert type(model.backbone.layer3[0].conv2).__name__ == "DeformConvBlock"
    if "c4" in name:
        assert type(model.roi_head.box_head).__name__ == "Res5Head" and model.neck is None
    if "dc5" in name:
        assert model.backbone.output_shape()["c5"].stride == 16 and model.neck is None


def test_init_from_torchvision_errors_name_the_key(tmp_path):
    from detkit.registry import ConfigError

    cfg = {"type": "TwoStageDetector", "num_classes": 3,
           "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c4"]},
           "rpn": {"type": "RPNHead", "anchor_sizes": [[16, 32, 64]]}, **TINY_HEADS,
           "init_from_torchvision": str(tmp_path / "missing.pth")}
    with pytest.raises(ConfigError, match=r"model\.init_from_torchvision.*missing\.pth"):
        build_model(cfg)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a torchvision fasterrcnn_resnet50_fpn state dict"):
        build_model(dict(cfg, init_from_torchvision=str(tmp_path / "other.pth")))
