"""HGNetv2 against transformers' ``HGNetV2Backbone`` (random weights, converted state dict)."""

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import DFineConfig, HGNetV2Backbone, HGNetV2Config  # noqa: E402
from transformers.models.d_fine.modeling_d_fine import replace_batch_norm  # noqa: E402

from detkit.models.backbones.hgnetv2 import HGNETV2_PRESETS, HGNetv2  # noqa: E402
from detkit.models.convert import hf_backbones  # noqa: E402
from detkit.models.convert.transformers import ConversionError  # noqa: E402
from detkit.registry import BACKBONES  # noqa: E402

PREFIX = hf_backbones.BACKBONE_PREFIX


def randomise(module: nn.Module, seed: int) -> None:
    """Random BN statistics / affine and learnable-affine scalars, so eval mode and LAB matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("lab.scale") or name.endswith("lab.bias"):
                p.copy_(torch.rand(1, generator=g) * 0.5 + (0.75 if name.endswith("scale") else -0.25))
        for m in module.modules():
            if getattr(m, "running_mean", None) is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)


def hf_config(preset: str, use_lab: bool, out=("stage2", "stage3", "stage4"), **overrides):
    p = HGNETV2_PRESETS[preset]
    rows = p["stages"]
    fields = dict(stem_channels=p["stem_channels"],
                  stage_in_channels=[r["in_channels"] for r in rows],
                  stage_mid_channels=[r["mid_channels"] for r in rows],
                  stage_out_channels=[r["out_channels"] for r in rows],
                  hidden_sizes=[r["out_channels"] for r in rows],
                  stage_num_blocks=[r["num_blocks"] for r in rows],
                  stage_downsample=[r["downsample"] for r in rows],
                  stage_light_block=[r["light_block"] for r in rows],
                  stage_kernel_size=[r["kernel_size"] for r in rows],
                  stage_numb_of_layers=[r["num_layers"] for r in rows],
                  use_learnable_affine_block=use_lab, out_features=list(out))
    fields.update(overrides)
    return HGNetV2Config(**fields)


def assert_close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


# D-FINE-N/S (B0 with LAB, two or three levels) and D-FINE-L (B4 without LAB); frozen BN as
# transformers' DFineModel uses by default, plain BN too
@pytest.mark.parametrize("preset,use_lab,out,frozen", [
    ("B0", True, ("stage3", "stage4"), True),
    ("B4", False, ("stage2", "stage3", "stage4"), False)])
def test_hgnetv2_equals_transformers(preset, use_lab, out, frozen):
    torch.manual_seed(0)
    bb = hf_config(preset, use_lab, out)
    config = DFineConfig(backbone_config=bb, freeze_backbone_batch_norms=frozen,
                         encoder_in_channels=[1] * len(out))
    hf = HGNetV2Backbone(bb).eval()
    randomise(hf, 1)
    if frozen:
        with torch.no_grad():
            replace_batch_norm(hf)
    cfg = hf_backbones.backbone_config(config)
    assert cfg["name"] == preset and cfg["use_lab"] is use_lab
    assert cfg["norm"] == ("FrozenBN" if frozen else "BN")
    assert cfg["out_features"] == [f"c{int(s[5:]) + 1}" for s in out]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = BACKBONES.build(cfg)
    state = {PREFIX + k: v for k, v in hf.state_dict().items()}
    converted = hf_backbones.convert_backbone(state, config)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()})
    backbone.eval()
    images = torch.rand(2, 3, 96, 160) * 2 - 1
    with torch.no_grad():
        expected = hf(images).feature_maps
        got = backbone(images)
    assert len(expected) == len(got)
    for ref, (name, value) in zip(expected, got.items()):
        assert ref.abs().mean() > 1e-3
        assert_close(value, ref)
        spec = backbone.output_shape()[name]
        assert value.shape[1:] == (spec.channels, -(-96 // spec.stride), -(-160 // spec.stride))


def test_transformers_default_config_is_the_b4_preset():
    """HGNetV2Config's defaults are PP-HGNetV2-B4: the table of presets agrees with them."""
    cfg = hf_backbones.backbone_config(DFineConfig())
    assert cfg["type"] == "HGNetv2" and cfg["name"] == "B4" and cfg["use_lab"] is False


@pytest.mark.parametrize("preset", list(HGNETV2_PRESETS))
def test_every_preset_converts_key_for_key(preset):
    """Each preset, as a transformers config, converts with every key and shape (meta device)."""
    bb = hf_config(preset, use_lab=preset in ("B0", "B2"))
    config = DFineConfig(backbone_config=bb)
    with torch.device("meta"):
        state = {PREFIX + k: v for k, v in HGNetV2Backbone(bb).state_dict().items()}
    assert hf_backbones.backbone_config(config)["name"] == preset
    converted = hf_backbones.convert_backbone(state, config)
    assert len(converted) == len([k for k in state if not k.endswith("num_batches_tracked")])


def test_custom_architecture_and_converter_errors():
    bb = hf_config("B0", True, stage_mid_channels=[8, 16, 32, 64])
    config = DFineConfig(backbone_config=bb, freeze_backbone_batch_norms=False)
    cfg = hf_backbones.backbone_config(config)
    assert cfg["name"] is None and cfg["stages"][0]["mid_channels"] == 8
    hf = HGNetV2Backbone(bb)
    state = {PREFIX + k: v for k, v in hf.state_dict().items()}
    assert len(hf_backbones.convert_backbone(state, config)) == len(state)
    extra = dict(state, **{PREFIX + "embedder.stem5.convolution.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"left over.*embedder\.stem5\.convolution\.weight"):
        hf_backbones.convert_backbone(extra, config)
    gone = PREFIX + "encoder.stages.2.blocks.1.aggregation.1.convolution.weight"
    with pytest.raises(ConversionError, match=r"missing.*stages\.2\.blocks\.1\.excite\.conv\.weight"):
        hf_backbones.convert_backbone({k: v for k, v in state.items() if k != gone}, config)
    with pytest.raises(ConversionError, match="stem_strides"):
        bad = hf_config("B0", True, stem_strides=[2, 2, 1, 2, 1])
        hf_backbones.backbone_config(DFineConfig(backbone_config=bad))


def test_frozen_stages_and_argument_errors():
    net = HGNetv2(name="B0", frozen_stages=1)
    assert not any(p.requires_grad for p in net.stem.parameters())
    assert not any(p.requires_grad for p in net.stages[0].parameters())
    assert all(p.requires_grad for p in net.stages[1].parameters())
    assert len(net.stages) == 4 and len(HGNetv2(name="B0", out_features=["c3"]).stages) == 2
    with pytest.raises(ValueError, match="unknown name 'B9'"):
        HGNetv2(name="B9")
    with pytest.raises(ValueError, match="num_layers"):
        HGNetv2(name="B0", stages=[{"in_channels": 1}] * 4)
