"""Converted torchvision Faster R-CNN == torchvision on image sizes that are not multiples of 64.

On such sizes the max-pooled P6 grid is rounded up and torchvision places its anchors at
multiples of ``padded_size // grid_size`` (e.g. 288 // 5 = 57 instead of 64). detkit's default
geometric strides differ there; loading torchvision weights must switch the anchors to
torchvision's rounding (``stride_mode="torchvision"``) so that proposals and detections agree.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from detkit.data.shapes import render_image
from detkit.inference import apply_checkpoint
from detkit.models import build_model

# (H, W): padded to multiples of 32 whose P6 grids (ceil(ceil(x / 32) / 2)) are rounded up
SIZES = [(200, 301), (257, 190), (224, 350)]
R50_FPN = {"type": "TwoStageDetector", "num_classes": 90,
           "backbone": {"type": "ResNet", "depth": 50, "norm": "BN"},  # BN in eval mode, as torchvision's
           "neck": {"type": "FPN", "out_channels": 256, "extra_levels": "maxpool"},
           "rpn": {"type": "RPNHead"}, "roi_head": {"type": "RoIHead", "score_thresh": 0.05}}


def _shapes_image(size: tuple[int, int], index: int) -> torch.Tensor:
    """A shapes-dataset drawing (textured background, shaded shapes, noise) resized to ``size``."""
    image, _, _ = render_image(seed=14, split="val", index=index, size=320)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]


@pytest.fixture(scope="module")
def confident_pair():
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    with torch.no_grad():  # random weights score ~1/91; sharper logits give detections of 0.6-0.97
        tv.roi_heads.box_predictor.cls_score.weight.mul_(2.0)
    tv.transform.resize = lambda image, target=None: (image, target)  # images are pre-sized
    model = build_model(R50_FPN)
    apply_checkpoint(model, {"model": tv.state_dict()}, "torchvision state dict")
    return tv.eval(), model.eval()


def _run(net, image, rpn_module, hook_kind):
    proposals: list = []
    if hook_kind == "output":
        hook = rpn_module.register_forward_hook(lambda mod, args, out: proposals.extend(out[0]))
    else:
        hook = rpn_module.register_forward_pre_hook(lambda mod, args: proposals.extend(args[1]))
    try:
        with torch.no_grad():
            detections = net([image])[0]
    finally:
        hook.remove()
    return proposals[0], detections


@pytest.mark.slow
@pytest.mark.parametrize("index,size", list(enumerate(SIZES)))
def test_converted_r50_fpn_equals_torchvision_on_odd_sizes(confident_pair, index, size):
    tv, model = confident_pair
    assert model.rpn.anchor_generator.stride_mode == "torchvision"  # switched on by the loader
    image = _shapes_image(size, index)
    tv_props, expected = _run(tv, image, tv.rpn, "output")
    props, got = _run(model, image, model.roi_head, "pre")
    assert props.shape == tv_props.shape and (props - tv_props).abs().max() < 1e-3
    assert expected["scores"].numel() >= 10 and expected["scores"].max() > 0.8
    assert got["boxes"].shape == expected["boxes"].shape
    assert (got["boxes"] - expected["boxes"]).abs().max() < 1e-3
    assert (got["scores"] - expected["scores"]).abs().max() < 1e-4
    assert torch.equal(got["labels"], expected["labels"] - 1)  # torchvision's 0 is background


@pytest.mark.slow
def test_geometric_strides_differ_from_torchvision_on_odd_sizes(confident_pair):
    """The default (for models trained in detkit) keeps P6 anchors at multiples of 64."""
    tv, model = confident_pair
    image = _shapes_image(SIZES[0], 0)
    tv_props, _ = _run(tv, image, tv.rpn, "output")
    model.rpn.anchor_generator.stride_mode = "geometric"
    try:
        props, _ = _run(model, image, model.roi_head, "pre")
    finally:
        model.rpn.anchor_generator.stride_mode = "torchvision"
    assert props.shape != tv_props.shape or (props - tv_props).abs().max() > 1.0


def test_converted_checkpoint_meta_switches_the_anchors():
    from detkit.models.convert import apply_converted_meta

    model = build_model(dict(R50_FPN, backbone={"type": "ResNet", "depth": 18}))
    apply_converted_meta(model, {"arch": "fasterrcnn_resnet50_fpn"})
    assert model.rpn.anchor_generator.stride_mode == "geometric"  # a detkit-trained checkpoint
    apply_converted_meta(model, {"anchor_stride_mode": "torchvision"})  # tools/convert_weights.py
    assert model.rpn.anchor_generator.stride_mode == "torchvision"
