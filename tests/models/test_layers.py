"""Layers: ConvNormAct, FrozenBatchNorm2d, DeformConvBlock, ASPP, load_state_dict_checked."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

from detkit.models.layers.aspp import ASPP
from detkit.models.layers.conv import ConvNormAct
from detkit.models.layers.deform_conv import DeformConvBlock
from detkit.models.layers.frozen_bn import FrozenBatchNorm2d, freeze_batch_norm
from detkit.models.utils import load_state_dict_checked


@pytest.mark.parametrize("size", [(16, 16), (13, 19)])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 3)])
def test_conv_norm_act_shape_and_value(size, stride, dilation):
    torch.manual_seed(0)
    m = ConvNormAct(4, 6, 3, stride=stride, dilation=dilation, norm="BN", act="leaky_relu").eval()
    x = torch.randn(2, 4, *size)
    y = m(x)
    assert y.shape == (2, 6, -(-size[0] // stride), -(-size[1] // stride))
    ref = F.leaky_relu(m.norm(F.conv2d(x, m.conv.weight, None, stride, dilation, dilation)), 0.1)
    torch.testing.assert_close(y, ref)
    assert m.conv.bias is None  # a bias before a norm is redundant


def test_conv_norm_act_variants_and_errors():
    assert ConvNormAct(3, 8, 1, norm=None, act=None).conv.bias is not None
    assert isinstance(ConvNormAct(3, 64, norm="GN").norm, nn.GroupNorm)
    assert isinstance(ConvNormAct(3, 8, norm="FrozenBN").norm, FrozenBatchNorm2d)
    assert isinstance(ConvNormAct(3, 8, act="silu").act, nn.SiLU)
    assert len(ConvNormAct(3, 8, norm="none", act="none")) == 1
    with pytest.raises(ValueError, match="unknown norm 'LN'"):
        ConvNormAct(3, 8, norm="LN")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        ConvNormAct(3, 8, act="gelu")


def _random_bn(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return bn.eval()


def test_frozen_bn_equals_eval_batch_norm_and_torchvision():
    torch.manual_seed(0)
    bn = _random_bn(5)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is accepted and dropped
    reference = torchvision.ops.FrozenBatchNorm2d(5)
    reference.load_state_dict(bn.state_dict())
    x = torch.randn(2, 5, 7, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    torch.testing.assert_close(frozen(x), reference(x))
    assert list(frozen.parameters()) == []
    frozen.train()
    torch.testing.assert_close(frozen(x), bn(x))  # statistics stay fixed in train mode


def test_freeze_batch_norm_converts_a_network():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    before = net(x)
    freeze_batch_norm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) == 20
    torch.testing.assert_close(net.train()(x), before)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 2, 2, 1), (1, 1, 1, 2)])
def test_deform_conv_at_init_equals_conv(version, stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride, padding, dilation=dilation, groups=groups).double()
    block = DeformConvBlock.from_conv(conv, version=version).double()
    x = torch.randn(2, 4, 11, 14, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x), rtol=0, atol=1e-12)
    assert set(dict(block.named_parameters())) == {"weight", "bias", "offset_conv.weight", "offset_conv.bias"}


def test_deform_conv_offsets_and_mask_are_wired():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, 1, 1).double()
    x = torch.randn(1, 3, 9, 10, dtype=torch.float64)
    block = DeformConvBlock.from_conv(conv, version=2).double()
    with torch.no_grad():  # offsets are (dy, dx) per kernel tap: dx = +1 samples one pixel right
        block.offset_conv.bias[:18].view(9, 2)[:, 1] = 1.0
    shifted = conv(F.pad(x, (0, 1))[..., 1:])  # input moved one pixel left == sampling right
    # The first and last columns differ only in which taps fall on the zero padding.
    torch.testing.assert_close(block(x)[..., 1:-1], shifted[..., 1:-1], rtol=0, atol=1e-12)
    assert not torch.allclose(block(x)[..., 1:-1], conv(x)[..., 1:-1])
    with torch.no_grad():
        block.offset_conv.bias[18:] = -1e4  # mask = 2*sigmoid(-1e4) = 0: only the bias is left
    torch.testing.assert_close(block(x), conv.bias.view(1, -1, 1, 1).expand(1, 5, 9, 10))


def test_deform_conv_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = DeformConvBlock(3, 4, 3, version=2)
    block(torch.randn(2, 3, 8, 8)).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        DeformConvBlock(3, 4, version=3)


def test_aspp_equals_torchvision_deeplabv3_aspp():
    torch.manual_seed(0)
    ours = ASPP(8, 6, rates=(2, 3, 5)).eval()
    reference = TorchvisionASPP(8, [2, 3, 5], 6).eval()
    for module in ours.modules():  # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.load_state_dict(_random_bn(module.num_features).state_dict())
    pairs = list(zip(ours.state_dict().values(), reference.state_dict().values()))
    assert len(pairs) == len(ours.state_dict()) == len(reference.state_dict())
    with torch.no_grad():
        for a, b in pairs:
            assert a.shape == b.shape
            b.copy_(a)
    for size in [(12, 12), (9, 13)]:
        x = torch.randn(2, 8, *size)
        torch.testing.assert_close(ours(x), reference(x))
        assert ours(x).shape == (2, 6, *size)


def test_load_state_dict_checked_reports_key_and_both_shapes():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bad = dict(module.state_dict())
    bad["0.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError) as err:
        load_state_dict_checked(module, bad, source="ckpt.pth")
    message = str(err.value)
    assert "ckpt.pth" in message and "0.weight" in message
    assert "expected (4, 3, 3, 3)" in message and "got (8, 3, 3, 3)" in message
    missing = {k: v for k, v in module.state_dict().items() if k != "1.bias"}
    missing["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): 1.bias.*unexpected keys \(1\): extra.weight"):
        load_state_dict_checked(module, {k: v + 1 for k, v in missing.items()})
    for k, v in module.state_dict().items():  # a failed load copies nothing
        torch.testing.assert_close(v, before[k])
    result = load_state_dict_checked(module, missing, strict=False)
    assert result.missing_keys == ["1.bias"] and result.unexpected_keys == ["extra.weight"]
