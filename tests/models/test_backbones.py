"""Backbones: ResNet (torchvision parity, dilation, DCN, frozen stages, weights) and Darknet53."""

import math

import pytest
import torch
import torchvision
from torch import nn

from detkit.models.backbones.darknet import Darknet53
from detkit.models.backbones.mobilenet import MobileNetV3
from detkit.models.backbones.resnet import ResNet
from detkit.models.layers.deform_conv import DeformConvBlock
from detkit.models.layers.frozen_bn import FrozenBatchNorm2d
from detkit.registry import BACKBONES, ConfigError

SIZES = [(64, 64), (70, 83)]  # the second is not divisible by 32


def _check_shapes(model, size, expected):
    """Outputs match ``expected`` {name: (channels, stride)} and ``output_shape()``."""
    out = model(torch.randn(2, 3, *size))
    assert list(out) == list(expected) == list(model.output_shape())
    for name, (channels, stride) in expected.items():
        spec = model.output_shape()[name]
        assert (spec.channels, spec.stride) == (channels, stride)
        assert out[name].shape == (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def _torchvision_features(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    feats = {}
    for i in range(1, 5):
        x = getattr(net, f"layer{i}")(x)
        feats[f"c{i + 1}"] = x
    return feats


def _assert_all_grads(model, out):
    sum(o.square().mean() for o in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("depth,channels", [(18, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048))])
def test_resnet_shapes(depth, channels, size):
    model = ResNet(depth=depth).eval()
    _check_shapes(model, size, {f"c{i + 2}": (c, 4 * 2 ** i) for i, c in enumerate(channels)})


def test_resnet_matches_torchvision_and_drops_unused_stages():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    model = ResNet(depth=50, out_features=["c3", "c4"]).eval()
    expected_keys = {k for k in reference.state_dict() if not k.startswith(("fc.", "layer4."))}
    assert set(model.state_dict()) == expected_keys
    model.load_state_dict_from(reference.state_dict())  # fc and layer4 are dropped
    x = torch.randn(1, 3, 64, 80)
    ours, ref = model(x), _torchvision_features(reference, x)
    assert list(ours) == ["c3", "c4"]
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name])


def test_resnet_weights_from_file_and_errors(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save({"model": reference.state_dict()}, path)
    model = ResNet(depth=18, weights=str(path), norm="FrozenBN").eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x)["c5"], _torchvision_features(reference, x)["c5"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNet(depth=18, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="IMAGENET9K"):
        ResNet(depth=18, weights="IMAGENET9K_V1")
    with pytest.raises(ValueError) as err:  # a ResNet-18 file given to a ResNet-34 (same keys + more)
        ResNet(depth=50, weights=str(path))
    message = str(err.value)
    assert str(path) in message
    assert "layer1.0.conv1.weight: expected (64, 64, 1, 1), got (64, 64, 3, 3)" in message


def test_resnet_gradients_reach_every_parameter_with_dcn():
    torch.manual_seed(0)
    model = ResNet(depth=18, dcn_stages=["c4", "c5"], dcn_version=2).train()
    _assert_all_grads(model, model(torch.randn(2, 3, 64, 64)))


@pytest.mark.parametrize("output_stride,dilation", [(16, [False, False, True]), (8, [False, True, True])])
def test_resnet_dilation_matches_torchvision(output_stride, dilation):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilation).eval()
    model = ResNet(depth=50, output_stride=output_stride).eval()
    model.load_state_dict_from(reference.state_dict())
    x = torch.randn(1, 3, 64, 70)
    ours, ref = model(x), _torchvision_features(reference, x)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name])
    kept = "c4" if output_stride == 16 else "c3"
    expected_hw = (math.ceil(64 / output_stride), math.ceil(70 / output_stride))
    assert ours["c5"].shape[-2:] == ours[kept].shape[-2:] == expected_hw
    assert model.output_shape()["c5"].stride == output_stride


@pytest.mark.parametrize("size", SIZES)
def test_resnet18_dilation_keeps_spatial_size(size):
    model = ResNet(depth=18, dilation={"c4": 2, "c5": 4}).eval()
    _check_shapes(model, size, {"c2": (64, 4), "c3": (128, 8), "c4": (256, 8), "c5": (512, 8)})
    assert model.layer4[1].conv1.dilation == (4, 4) and model.layer4[0].conv1.dilation == (2, 2)
    with pytest.raises(ValueError, match="output_stride must be 32, 16 or 8"):
        ResNet(depth=18, output_stride=4)


def test_resnet_dcn_at_init_equals_plain_resnet():
    torch.manual_seed(0)
    plain = ResNet(depth=50, out_features=["c5"]).eval()
    dcn = ResNet(depth=50, out_features=["c5"], dcn_stages=["c3", "c4", "c5"], dcn_version=1).eval()
    dcn.load_state_dict_from(plain.state_dict())  # offset convs are absent and stay zero
    assert isinstance(dcn.layer3[0].conv2, DeformConvBlock)
    assert isinstance(dcn.layer1[0].conv2, nn.Conv2d)
    assert "layer3.0.conv2.weight" in dcn.state_dict()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dcn(x)["c5"], plain(x)["c5"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_resnet_frozen_stages(norm):
    torch.manual_seed(0)
    model = ResNet(depth=18, frozen_stages=1, norm=norm).train()
    frozen = [model.conv1, model.bn1, model.layer1]
    for module in frozen:
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not m.training for m in module.modules())
    assert model.layer2.training and all(p.requires_grad for p in model.layer2.parameters())
    stats = model.layer1[0].bn1.running_mean.clone()
    out = model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, stats)  # BN stayed in eval
    _assert_all_grads(model, out)  # every trainable parameter still gets a gradient
    assert all(p.grad is None for m in frozen for p in m.parameters())
    # torchvision's trainable_layers=3 (with its default FrozenBN) freezes the same parameters
    tv = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=3)
    tv_frozen = {k[len("body."):] for k, p in tv.named_parameters() if not p.requires_grad}
    ours = ResNet(depth=18, frozen_stages=1, norm="FrozenBN")
    assert {k for k, p in ours.named_parameters() if not p.requires_grad} == tv_frozen
    assert "layer1.0.conv1.weight" in tv_frozen and "layer2.0.conv1.weight" not in tv_frozen


def test_resnet_frozen_bn_norm_and_registry():
    model = BACKBONES.build({"type": "ResNet", "depth": 18, "norm": "FrozenBN", "out_features": ["c5"]})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    with pytest.raises(ConfigError, match="out_feature.*did you mean 'out_features'"):
        BACKBONES.build({"type": "ResNet", "out_feature": ["c5"]})
    with pytest.raises(ConfigError, match="depth must be one of"):
        BACKBONES.build({"type": "ResNet", "depth": 42})


@pytest.mark.parametrize("size", SIZES)
def test_darknet_tiny_shapes_and_gradients(size):
    torch.manual_seed(0)
    model = Darknet53(width_mult=0.25, depth_mult=0.33).train()
    _check_shapes(model.eval(), size, {"c3": (64, 8), "c4": (128, 16), "c5": (256, 32)})
    model.train()
    _assert_all_grads(model, model(torch.randn(2, 3, *size)))
    assert [len(getattr(model, f"stage{i}")) - 1 for i in range(1, 6)] == [1, 1, 3, 3, 1]


def test_darknet53_full_size_parameters():
    model = Darknet53(out_features=["c3", "c4", "c5"])
    assert [len(getattr(model, f"stage{i}")) - 1 for i in range(1, 6)] == [1, 2, 8, 8, 4]
    # YOLOv3 paper: 53 conv layers (52 here + the classifier) and ~41.6M parameters with the
    # 1024x1000 ImageNet classifier (1.025M), i.e. 40.58M for the convolutional body.
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 52
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 40.58) < 0.01
    assert model.output_shape()["c5"].channels == 1024


def test_darknet_frozen_stages_and_weights_error(tmp_path):
    model = Darknet53(width_mult=0.25, depth_mult=0.33, frozen_stages=2).train()
    assert not any(p.requires_grad for p in model.stage2.parameters())
    assert not model.stage1[0].norm.training and model.stage3[0].norm.training
    bad = Darknet53(width_mult=0.5, depth_mult=0.33).state_dict()
    path = tmp_path / "darknet.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"stem.conv.weight: expected \(8, 3, 3, 3\), got \(16, 3, 3, 3\)"):
        Darknet53(width_mult=0.25, depth_mult=0.33, weights=str(path))


@pytest.mark.parametrize("size", SIZES)
def test_mobilenet_v3_shapes(size):
    model = MobileNetV3(arch="mobilenet_v3_small", out_features=["c3", "c4", "c5"]).eval()
    _check_shapes(model, size, {"c3": (24, 8), "c4": (48, 16), "c5": (576, 32)})
