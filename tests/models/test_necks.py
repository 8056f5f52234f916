"""Necks: FPN (== torchvision's), SPP / SPPF, PAN, YOLOv3Neck."""

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detkit.models.necks.fpn import FPN
from detkit.models.necks.pan import PAN
from detkit.models.necks.spp import SPP, SpatialPyramidPooling
from detkit.models.necks.yolo_neck import YOLOv3Neck
from detkit.registry import NECKS, ConfigError
from detkit.structures import ShapeSpec

SHAPES = {"c2": ShapeSpec(8, 4), "c3": ShapeSpec(16, 8), "c4": ShapeSpec(24, 16), "c5": ShapeSpec(32, 32)}
SIZES = [(64, 64), (70, 83)]  # image sizes; the second is not divisible by 32


def _features(size, names=SHAPES, batch=2):
    """Backbone-like features: level of stride s has size ceil(H / s)."""
    return {n: torch.randn(batch, SHAPES[n].channels, math.ceil(size[0] / SHAPES[n].stride),
                           math.ceil(size[1] / SHAPES[n].stride)) for n in names}


def _check_outputs(neck, feats, size, expected):
    """Output names / channels / strides equal ``expected`` {name: (C, stride)} and output_shape()."""
    out = neck(feats)
    assert list(out) == list(expected) == list(neck.output_shape())
    for name, (channels, stride) in expected.items():
        assert neck.output_shape()[name] == ShapeSpec(channels, stride)
        assert out[name].shape == (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    return out


def _assert_all_grads(neck, out):
    sum(o.square().mean() for o in out.values()).backward()
    assert [n for n, p in neck.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("extra,names,expected_levels", [
    ("maxpool", ["c2", "c3", "c4", "c5"], [2, 3, 4, 5, 6]),
    ("conv_c5", ["c3", "c4", "c5"], [3, 4, 5, 6, 7]),
    ("conv_p5", ["c3", "c4", "c5"], [3, 4, 5, 6, 7]),
    (None, ["c3", "c4", "c5"], [3, 4, 5]),
])
def test_fpn_equals_torchvision(size, extra, names, expected_levels):
    torch.manual_seed(0)
    fpn = FPN(input_shapes=SHAPES, in_features=names, out_channels=16, extra_levels=extra)
    extra_block = {"maxpool": LastLevelMaxPool(), "conv_c5": LastLevelP6P7(32, 16),
                   "conv_p5": LastLevelP6P7(16, 16), None: None}[extra]
    reference = FeaturePyramidNetwork([SHAPES[n].channels for n in names], 16, extra_blocks=extra_block)
    for i in range(len(names)):
        assert type(fpn.lateral_convs[i]) is nn.Conv2d and fpn.lateral_convs[i].bias is not None
        reference.inner_blocks[i][0].load_state_dict(fpn.lateral_convs[i].state_dict())
        reference.layer_blocks[i][0].load_state_dict(fpn.output_convs[i].state_dict())
    if extra in ("conv_c5", "conv_p5"):
        reference.extra_blocks.p6.load_state_dict(fpn.extra_convs[0].state_dict())
        reference.extra_blocks.p7.load_state_dict(fpn.extra_convs[1].state_dict())
    feats = _features(size, names)
    expected = {f"p{k}": (16, 2 ** k) for k in expected_levels}
    out = _check_outputs(fpn, feats, size, expected)
    ref = reference(OrderedDict(feats))
    assert len(ref) == len(out)
    for ours, theirs in zip(out.values(), ref.values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    _assert_all_grads(fpn, out)


def test_fpn_lateral_order_norm_and_errors():
    fpn = FPN(input_shapes=SHAPES, out_channels=16)
    assert [c.in_channels for c in fpn.lateral_convs] == [8, 16, 24, 32]  # high -> low resolution
    gn = FPN(input_shapes=SHAPES, out_channels=32, norm="GN", extra_levels="maxpool")
    out = _check_outputs(gn, _features((64, 64)), (64, 64), {f"p{k}": (32, 2 ** k) for k in range(2, 7)})
    _assert_all_grads(gn, out)
    with pytest.raises(ConfigError, match="extra_levels must be one of"):
        NECKS.build({"type": "FPN", "extra_levels": "pool"}, input_shapes=SHAPES)
    with pytest.raises(ConfigError, match="c6"):
        NECKS.build({"type": "FPN", "in_features": ["c5", "c6"]}, input_shapes=SHAPES)


def _window_max(x, k):
    """Reference: max over the k x k window centred on each pixel, ignoring out-of-image cells."""
    out = torch.empty_like(x)
    r = k // 2
    for i in range(x.shape[-2]):
        for j in range(x.shape[-1]):
            out[..., i, j] = x[..., max(0, i - r): i + r + 1, max(0, j - r): j + r + 1].amax(dim=(-2, -1))
    return out


def test_spp_pooling_values_and_sppf_equals_spp():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 14)
    spp = SpatialPyramidPooling((5, 9, 13))(x)
    sppf = SpatialPyramidPooling((5, 9, 13), sequential=True)(x)
    assert spp.shape == (2, 12, 11, 14)
    assert torch.equal(spp, sppf)
    torch.testing.assert_close(spp[:, :3], x, rtol=0, atol=0)
    for i, k in enumerate((5, 9, 13)):
        torch.testing.assert_close(spp[:, 3 * (i + 1): 3 * (i + 2)], _window_max(x, k), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not repeated 5x5 pools"):
        SpatialPyramidPooling((5, 7, 13), sequential=True)


@pytest.mark.parametrize("size", SIZES)
def test_spp_and_sppf_necks_agree(size):
    torch.manual_seed(0)
    spp = SPP(input_shapes=SHAPES, out_channels=20).eval()
    sppf = NECKS.build({"type": "SPPF", "out_channels": 20}, input_shapes=SHAPES).eval()
    sppf.load_state_dict(spp.state_dict())
    feats = _features(size)
    expected = {n: (s.channels, s.stride) for n, s in SHAPES.items()}
    expected["c5"] = (20, 32)
    out = _check_outputs(spp, feats, size, expected)
    assert out["c3"] is feats["c3"]  # other levels pass through
    torch.testing.assert_close(sppf(feats)["c5"], out["c5"])
    _assert_all_grads(spp.train(), spp(feats))


@pytest.mark.parametrize("size", SIZES)
def test_pan_shapes_gradients_and_bottom_up(size):
    torch.manual_seed(0)
    names = ["c3", "c4", "c5"]
    pan = PAN(input_shapes=SHAPES, in_features=names, out_channels=16, extra_levels="maxpool")
    feats = _features(size, names)
    out = _check_outputs(pan, feats, size, {f"p{k}": (16, 2 ** k) for k in (3, 4, 5, 6)})
    fpn_out = pan.fpn(feats)
    torch.testing.assert_close(out["p3"], fpn_out["p3"])  # the highest-resolution level passes through
    expected_p4 = pan.pan_convs[0](fpn_out["p4"] + pan.downsample_convs[0](out["p3"]))
    torch.testing.assert_close(out["p4"], expected_p4)
    torch.testing.assert_close(out["p6"], F.max_pool2d(out["p5"], 1, 2))
    _assert_all_grads(pan, out)


def _count_convs(module):
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("spp", [False, True])
def test_yolov3_neck(size, spp):
    torch.manual_seed(0)
    neck = NECKS.build({"type": "YOLOv3Neck", "spp": spp}, input_shapes=SHAPES)
    assert neck.in_features == ["c3", "c4", "c5"]  # the three coarsest by default
    feats = _features(size, ["c3", "c4", "c5"])
    out = _check_outputs(neck, feats, size, {"p3": (8, 8), "p4": (12, 16), "p5": (16, 32)})
    # YOLOv3: 5 convs per level + 2 transition 1x1 convs; YOLOv3-SPP adds one 1x1 after the pools
    assert _count_convs(neck) == 3 * 5 + 2 + int(spp)
    assert any(isinstance(m, SpatialPyramidPooling) for m in neck.blocks[-1].modules()) == spp
    assert not any(isinstance(m, SpatialPyramidPooling) for m in neck.blocks[0].modules())
    _assert_all_grads(neck, out)


def test_yolov3_neck_full_size_channels():
    shapes = {"c3": ShapeSpec(256, 8), "c4": ShapeSpec(512, 16), "c5": ShapeSpec(1024, 32)}
    neck = YOLOv3Neck(input_shapes=shapes)
    assert neck.output_shape() == {"p3": ShapeSpec(128, 8), "p4": ShapeSpec(256, 16),
                                   "p5": ShapeSpec(512, 32)}
    # YOLOv3 input channels of the concat blocks: 512 + 256 = 768 and 256 + 128 = 384
    assert neck.blocks[1].convs[0].conv.in_channels == 768
    assert neck.blocks[0].convs[0].conv.in_channels == 384
