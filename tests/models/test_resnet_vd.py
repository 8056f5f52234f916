"""ResNet-vd (``ResNet(variant="vd")``) against transformers' ``RTDetrResNetBackbone``.

transformers' modules are built from small configs with random weights (no downloads); BN running
statistics and affine parameters are randomised so that eval-mode normalisation matters.
"""

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import RTDetrConfig, RTDetrResNetBackbone, RTDetrResNetConfig  # noqa: E402
from transformers.models.rt_detr.modeling_rt_detr import replace_batch_norm  # noqa: E402

from detkit.models.backbones.resnet import ResNet  # noqa: E402
from detkit.models.convert import hf_backbones  # noqa: E402
from detkit.models.convert.transformers import ConversionError  # noqa: E402
from detkit.registry import BACKBONES  # noqa: E402

PREFIX = hf_backbones.BACKBONE_PREFIX


def randomise_norms(module: nn.Module, seed: int) -> None:
    """Random BN statistics / affine so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if getattr(m, "running_mean", None) is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)


def hf_setup(layer_type, depths, hidden_sizes, embedding_size, frozen=True, seed=0):
    torch.manual_seed(seed)
    bb = RTDetrResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=hidden_sizes,
                            embedding_size=embedding_size, out_features=["stage2", "stage3", "stage4"])
    config = RTDetrConfig(backbone_config=bb, freeze_backbone_batch_norms=frozen,
                          encoder_in_channels=hidden_sizes[1:])
    hf = RTDetrResNetBackbone(bb).eval()
    randomise_norms(hf, seed)
    if frozen:   # as RTDetrModel does with freeze_backbone_batch_norms
        with torch.no_grad():
            replace_batch_norm(hf)
    state = {PREFIX + k: v for k, v in hf.state_dict().items()}
    return config, hf, state


def assert_close(out, ref):
    """Equal to 1e-5 relative to the output's magnitude (float32 sums of many terms)."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def build_converted(config, state):
    cfg = hf_backbones.backbone_config(config)
    with warnings.catch_warnings():   # "FrozenBN without weights" advice: the weights follow
        warnings.simplefilter("ignore")
        backbone = BACKBONES.build(cfg)
    converted = hf_backbones.convert_backbone(state, config)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()})
    return cfg, backbone.eval()


# ResNet-vd 18 (basic blocks) and 50 (bottlenecks) with the real block counts, small widths
VARIANTS = [("basic", [2, 2, 2, 2], [16, 32, 64, 128], 16, 18),
            ("bottleneck", [3, 4, 6, 3], [32, 64, 128, 256], 16, 50)]


@pytest.mark.parametrize("layer_type,depths,hidden,embedding,depth", VARIANTS)
@pytest.mark.parametrize("frozen", [True, False])
def test_resnet_vd_equals_transformers(layer_type, depths, hidden, embedding, depth, frozen):
    config, hf, state = hf_setup(layer_type, depths, hidden, embedding, frozen)
    cfg, backbone = build_converted(config, state)
    assert cfg["depth"] == depth and cfg["variant"] == "vd" and "stage_blocks" not in cfg
    assert cfg["norm"] == ("FrozenBN" if frozen else "BN")
    images = torch.rand(2, 3, 96, 160) * 2 - 1   # non-square, not 640, batch of 2
    with torch.no_grad():
        expected = hf(images).feature_maps
        got = backbone(images)
    assert list(got) == ["c3", "c4", "c5"]
    for ref, out in zip(expected, got.values()):
        assert ref.abs().mean() > 1e-2   # the comparison sees real activations
        assert_close(out, ref)


def test_resnet_vd_output_shape_matches_outputs_on_odd_sizes():
    backbone = ResNet(depth=18, variant="vd", out_features=["c2", "c3", "c4", "c5"],
                      stem_channels=16, stage_channels=[16, 32, 64, 128]).eval()
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 77, 131))
    for name, spec in backbone.output_shape().items():
        b, c, h, w = out[name].shape
        assert (c, h, w) == (spec.channels, -(-77 // spec.stride), -(-131 // spec.stride))


@pytest.mark.parametrize("depth,layer_type,blocks", [(18, "basic", [2, 2, 2, 2]), (34, "basic", [3, 4, 6, 3]),
                                                     (50, "bottleneck", [3, 4, 6, 3]),
                                                     (101, "bottleneck", [3, 4, 23, 3])])
def test_full_size_depths_convert_key_for_key(depth, layer_type, blocks):
    """The released RT-DETR backbones (default widths) map onto ResNet(depth, variant=vd) with
    every key and shape (checked on the meta device: no memory, no init)."""
    hidden = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    bb = RTDetrResNetConfig(layer_type=layer_type, depths=blocks, hidden_sizes=hidden,
                            out_features=["stage2", "stage3", "stage4"])
    config = RTDetrConfig(backbone_config=bb)
    with torch.device("meta"):
        state = {PREFIX + k: v for k, v in RTDetrResNetBackbone(bb).state_dict().items()}
    assert hf_backbones.backbone_config(config) == {
        "type": "ResNet", "depth": depth, "variant": "vd", "out_features": ["c3", "c4", "c5"],
        "norm": "FrozenBN"}
    converted = hf_backbones.convert_backbone(state, config)
    assert len(converted) == len([k for k in state if not k.endswith("num_batches_tracked")])


def test_converter_names_leftover_missing_and_misshaped_keys():
    config, _, state = hf_setup("basic", [1, 1, 1, 1], [8, 16, 32, 64], 8)
    extra = dict(state, **{PREFIX + "encoder.stages.1.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"left over.*encoder\.stages\.1\.layers\.0\.extra\.weight"):
        hf_backbones.convert_backbone(extra, config)
    key = PREFIX + "encoder.stages.2.layers.0.shortcut.1.convolution.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ConversionError, match=r"missing.*layer3\.0\.downsample\.1\.weight"):
        hf_backbones.convert_backbone(missing, config)
    bad = dict(state, **{key: torch.zeros(3, 3, 1, 1)})
    with pytest.raises(ConversionError, match="shapes differ"):
        hf_backbones.convert_backbone(bad, config)


def test_unsupported_backbone_options_are_clear_errors():
    for field in ("downsample_in_bottleneck", "downsample_in_first_stage"):
        bb = RTDetrResNetConfig(**{field: True})
        with pytest.raises(ConversionError, match=field):
            hf_backbones.backbone_config(RTDetrConfig(backbone_config=bb))


def test_vd_structure_and_options():
    net = ResNet(depth=50, variant="vd")
    assert not hasattr(net, "conv1") and len(net.stem) == 3
    assert isinstance(net.layer2[0].downsample[0], nn.AvgPool2d)
    assert isinstance(net.layer1[0].downsample[0], nn.Identity)   # stride 1: projection only
    assert net.layer2[1].downsample is None
    r18 = ResNet(depth=18, variant="vd")
    assert r18.layer1[0].downsample is not None   # RT-DETR's forced shortcut in stage 1
    dc5 = ResNet(depth=18, variant="vd", output_stride=16).eval()
    assert isinstance(dc5.layer4[0].downsample[0], nn.Identity)
    with torch.no_grad():
        assert dc5(torch.rand(1, 3, 64, 96))["c5"].shape[-2:] == (4, 6)
    frozen = ResNet(depth=18, variant="vd", frozen_stages=1)
    assert not any(p.requires_grad for p in frozen.stem.parameters())
    assert all(p.requires_grad for p in frozen.layer2.parameters())
    with pytest.raises(ValueError, match="no torchvision weights"):
        ResNet(depth=18, variant="vd", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="variant"):
        ResNet(depth=18, variant="vc")
    with pytest.raises(ValueError, match="need variant: vd"):
        ResNet(depth=18, stage_blocks=[1, 1, 1, 1])
