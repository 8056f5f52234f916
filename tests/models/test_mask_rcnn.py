"""Mask R-CNN end to end: torchvision's maskrcnn_resnet50_fpn weights converted into detkit give
torchvision's boxes and masks (on shapes drawings of sizes that are not multiples of 64) and its
training losses, mask loss included; the converter's mask keys, the CLI and the configs."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn

from detkit.config import load_config
from detkit.data.shapes import render_image
from detkit.inference import apply_checkpoint
from detkit.models import build_model
from detkit.models.convert import COCO_CATEGORY_IDS, torchvision_to_detkit
from detkit.models.mask_paste import paste_masks

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "mask_rcnn"
SIZES = [(200, 301), (257, 190)]   # P6 grids rounded up: torchvision's anchor strides apply


def _shapes_image(size: tuple[int, int], index: int) -> torch.Tensor:
    """A shapes-dataset drawing (textured background, shaded shapes, noise) resized to ``size``."""
    image, _, _ = render_image(seed=18, split="val", index=index, size=320)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """torchvision's random model made confident (no resizing) and detkit's COCO config with its weights."""
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    with torch.no_grad():  # random weights score ~1/91; sharper logits give detections of 0.6-0.97
        tv.roi_heads.box_predictor.cls_score.weight.mul_(2.0)
    tv.transform.resize = lambda image, target=None: (image, target)  # images are pre-sized
    path = tmp_path_factory.mktemp("tv") / "maskrcnn_r50_fpn.pth"
    torch.save(tv.state_dict(), path)
    cfg = load_config(CONFIGS / "mask_rcnn_r50_fpn_coco.yaml", [
        "model.backbone.weights=null", "model.num_classes=90", f"model.init_from_torchvision={path}"])
    model = build_model(cfg["model"])
    return tv.eval(), model.eval(), path


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))  # both empty: equal


@pytest.mark.slow
@pytest.mark.parametrize("index,size", list(enumerate(SIZES)))
def test_r50_fpn_boxes_and_masks_equal_torchvision(pair, index, size):
    tv, model, _ = pair
    assert model.rpn.anchor_generator.stride_mode == "torchvision"   # switched on by the converter
    image = _shapes_image(size, index)
    with torch.no_grad():
        expected, got = tv([image])[0], model([image])[0]
    assert expected["scores"].numel() >= 10 and expected["scores"].max() > 0.8
    assert got["boxes"].shape == expected["boxes"].shape
    assert (got["boxes"] - expected["boxes"]).abs().max() < 1e-3
    assert (got["scores"] - expected["scores"]).abs().max() < 1e-4
    assert torch.equal(got["labels"], expected["labels"] - 1)  # torchvision's 0 is background
    assert got["masks"].dtype == torch.bool and got["masks"].shape == (len(got["boxes"]), *size)
    tv_probs = expected["masks"][:, 0]
    assert (tv_probs > 0.5).flatten(1).any(1).float().mean() > 0.7    # most masks are not empty
    # The probabilities behind the binarised masks agree to float noise ...
    with torch.no_grad():
        ours = model.forward_test(model.preprocess([image]))[0]
    probs = paste_masks(ours["mask_probs"], ours["boxes"], size, threshold=None)
    assert (probs - tv_probs).abs().max() < 1e-4
    # ... so binarised masks agree except where torchvision's probability is 0.5 to that noise
    # (random weights put some pixels there); IoU >= 0.99 per detection on the other pixels.
    decided = (tv_probs - 0.5).abs() > 1e-4
    iou = _mask_iou(got["masks"] & decided, (tv_probs > 0.5) & decided)
    assert iou.min() >= 0.99
    assert (got["masks"] != (tv_probs > 0.5)).sum() <= (~decided).sum()


@pytest.mark.slow
def test_r50_fpn_training_losses_equal_torchvision(pair):
    tv, model, _ = pair
    images = [_shapes_image(size, i) for i, size in enumerate(SIZES)]
    masks = [torch.zeros(2, *SIZES[0], dtype=torch.uint8), torch.zeros(1, *SIZES[1], dtype=torch.uint8)]
    masks[0][0, 22:118, 12:98] = 1
    masks[0][1, 40:190, 160:290] = 1
    masks[0][1, 40:100, 160:200] = 0      # not a box-shaped mask
    masks[1][0, 60:100, 50:95] = 1
    targets = [{"boxes": torch.tensor([[12.0, 22.0, 98.0, 118.0], [160.0, 40.0, 290.0, 190.0]]),
                "labels": torch.tensor([0, 16]), "masks": masks[0]},
               {"boxes": torch.tensor([[50.0, 60.0, 95.0, 100.0]]), "labels": torch.tensor([3]),
                "masks": masks[1]}]
    tv_targets = [dict(t, labels=t["labels"] + 1) for t in targets]
    # torchvision's random model has BatchNorm2d, detkit's COCO config FrozenBN: keep BN in eval.
    tv.train()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model.train()
    try:
        torch.manual_seed(11)
        expected = tv(images, tv_targets)
        torch.manual_seed(11)
        got = model(images, [dict(t, masks=t["masks"].bool()) for t in targets])
    finally:
        tv.eval(), model.eval()
    pairs = {"loss_rpn_cls": "loss_objectness", "loss_rpn_box": "loss_rpn_box_reg",
             "loss_cls": "loss_classifier", "loss_box": "loss_box_reg", "loss_mask": "loss_mask"}
    assert set(got) == set(pairs)
    for ours, theirs in pairs.items():
        assert abs(got[ours].item() - expected[theirs].item()) < 1e-4, (ours, got[ours], expected[theirs])
        assert got[ours].item() > 0


def _fake_state(num_classes: int = 91) -> dict:
    """The predictor tensors of a torchvision Mask R-CNN state dict, rows numbered by class."""
    rows = torch.arange(float(num_classes))
    return {"roi_heads.box_predictor.cls_score.weight": rows[:, None].repeat(1, 2),
            "roi_heads.box_predictor.cls_score.bias": rows.clone(),
            "roi_heads.box_predictor.bbox_pred.weight": torch.arange(num_classes * 4.0)[:, None],
            "roi_heads.box_predictor.bbox_pred.bias": torch.arange(num_classes * 4.0),
            "roi_heads.mask_predictor.mask_fcn_logits.weight": rows[:, None, None, None].repeat(1, 3, 1, 1),
            "roi_heads.mask_predictor.mask_fcn_logits.bias": rows.clone(),
            "roi_heads.mask_predictor.conv5_mask.weight": torch.ones(3, 3, 2, 2),
            "roi_heads.mask_head.0.0.weight": torch.ones(3, 3, 3, 3),
            "roi_heads.mask_head.mask_fcn4.bias": torch.ones(3)}   # torchvision < 0.13 name


def test_convert_mask_keys_and_class_rows():
    out = torchvision_to_detkit(_fake_state(), arch="maskrcnn_resnet50_fpn", class_ids=COCO_CATEGORY_IDS)
    assert out["mask_head.logits.bias"].tolist() == [float(i) for i in COCO_CATEGORY_IDS]  # no background
    assert out["mask_head.logits.weight"].shape == (80, 3, 1, 1)
    assert out["roi_head.cls_score.bias"][-1].item() == 0.0                               # background last
    assert {"mask_head.deconv.weight", "mask_head.convs.0.weight", "mask_head.convs.3.bias"} <= set(out)
    with pytest.raises(ValueError, match="no detkit counterpart"):   # mask keys need the mask arch
        torchvision_to_detkit(_fake_state(), arch="fasterrcnn_resnet50_fpn")
    box_only = {k: v for k, v in _fake_state().items() if "mask" not in k}
    with pytest.raises(ValueError, match="mask_fcn_logits.*fasterrcnn_resnet50_fpn"):
        torchvision_to_detkit(box_only, arch="maskrcnn_resnet50_fpn")


@pytest.mark.slow
def test_convert_weights_cli_and_predictor_load(pair, tmp_path):
    _, model, path = pair
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "detkit.pth"
    assert cli.main([str(path), str(out), "--arch", "maskrcnn_resnet50_fpn"]) == 0
    state = torch.load(out, map_location="cpu", weights_only=True)["model"]
    own = model.state_dict()
    assert torch.equal(state["mask_head.logits.weight"], own["mask_head.logits.weight"])
    assert set(own) - set(state) <= {k for k in own if k.endswith("num_batches_tracked")}
    # A bare torchvision Mask R-CNN state dict given to the Predictor's loader is recognised too.
    other = build_model(load_config(CONFIGS / "mask_rcnn_r50_fpn_coco.yaml",
                                    ["model.backbone.weights=null", "model.num_classes=90"])["model"])
    apply_checkpoint(other, torch.load(path, map_location="cpu", weights_only=True), path)
    assert torch.equal(other.state_dict()["mask_head.deconv.weight"], own["mask_head.deconv.weight"])


@pytest.mark.parametrize("name", ["r50_fpn_coco", "r18_fpn_shapes"])
def test_configs_build(name):
    cfg = load_config(CONFIGS / f"mask_rcnn_{name}.yaml",
                      ["model.backbone.weights=null", "model.backbone.depth=18"])
    model = build_model(cfg["model"])
    assert type(model.mask_head).__name__ == "MaskRoIHead" and model.mask_head.mask_size == 28
    assert model.mask_head.num_classes == {"coco": 80, "shapes": 4}[name.split("_")[-1]]
    assert cfg["data"]["train"]["dataset"]["instance_masks"] is True
    assert list(cfg["evaluation"]["iou_types"]) == ["bbox", "segm"]
