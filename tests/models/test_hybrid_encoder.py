"""HybridEncoder (+ backbone) against transformers' RT-DETR v1/v2 and D-FINE encoders.

The transformers models are the whole ``...ForObjectDetection`` built from small configs with
random weights; the converters read their full state dicts. The reference encoder output is
``model.encoder(encoder_input_proj(backbone(x)))``, transformers' own path.
"""

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DFineConfig,
    DFineForObjectDetection,
    HGNetV2Config,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrResNetConfig,
    RTDetrV2Config,
    RTDetrV2ForObjectDetection,
)
from transformers.models.rt_detr.modeling_rt_detr import build_2d_sinusoidal_position_embedding  # noqa: E402

from detkit.models.convert import hf_backbones  # noqa: E402
from detkit.models.convert.transformers import ConversionError  # noqa: E402
from detkit.models.necks.hybrid_encoder import HybridEncoder, sincos_position_embedding_2d  # noqa: E402
from detkit.registry import BACKBONES, NECKS  # noqa: E402
from detkit.structures import ShapeSpec  # noqa: E402

SMALL_DECODER = dict(d_model=32, decoder_ffn_dim=64, decoder_layers=2, num_queries=10, num_labels=3,
                     decoder_attention_heads=4, encoder_attention_heads=4, encoder_hidden_dim=32,
                     encoder_ffn_dim=64)


def rtdetr_v1():
    bb = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1],
                            out_features=["stage2", "stage3", "stage4"])
    cfg = RTDetrConfig(backbone_config=bb, encoder_in_channels=[64, 128, 256], hidden_expansion=0.5,
                       decoder_in_channels=[32, 32, 32], **SMALL_DECODER)
    return cfg, RTDetrForObjectDetection


def rtdetr_v2():   # basic blocks, two encoder layers, ReLU in CCFM
    bb = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    cfg = RTDetrV2Config(backbone_config=bb, encoder_in_channels=[32, 64, 128], encoder_layers=2,
                         activation_function="relu",
                         decoder_in_channels=[32, 32, 32], **SMALL_DECODER)
    return cfg, RTDetrV2ForObjectDetection


def _hgnet(out):
    return HGNetV2Config(stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 64, 128],
                         stage_mid_channels=[8, 16, 32, 64], stage_out_channels=[32, 64, 128, 256],
                         hidden_sizes=[32, 64, 128, 256], stage_num_blocks=[1, 1, 2, 1],
                         stage_numb_of_layers=[2, 2, 2, 2], use_learnable_affine_block=True,
                         out_features=out)


def dfine_n():   # D-FINE-N's neck: two levels, expansion 0.34, depth 0.5
    cfg = DFineConfig(backbone_config=_hgnet(["stage3", "stage4"]), encoder_in_channels=[128, 256],
                      feat_strides=[16, 32], encode_proj_layers=[1], hidden_expansion=0.34,
                      depth_mult=0.5, decoder_in_channels=[32, 32], num_feature_levels=2,
                      decoder_n_points=[6, 6], **SMALL_DECODER)
    return cfg, DFineForObjectDetection


def dfine_s():   # D-FINE-S's neck: three levels, expansion 0.5, depth 0.34
    cfg = DFineConfig(backbone_config=_hgnet(["stage2", "stage3", "stage4"]),
                      encoder_in_channels=[64, 128, 256], hidden_expansion=0.5, depth_mult=0.34,
                      decoder_in_channels=[32, 32, 32], **SMALL_DECODER)
    return cfg, DFineForObjectDetection


def randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def build_pair(make, seed=0):
    torch.manual_seed(seed)
    config, cls = make()
    hf = cls(config).eval()
    randomise(hf, seed)
    converted = hf_backbones.convert_backbone_and_encoder(hf.state_dict(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = BACKBONES.build(hf_backbones.backbone_config(config))
    neck = NECKS.build(hf_backbones.encoder_config(config), input_shapes=backbone.output_shape())
    backbone.load_state_dict({k[9:]: v for k, v in converted.items() if k.startswith("backbone.")})
    neck.load_state_dict({k[5:]: v for k, v in converted.items() if k.startswith("neck.")})
    return config, hf, backbone.eval(), neck.eval(), converted


@pytest.mark.parametrize("make,fusion", [(rtdetr_v1, "CSPRep"), (rtdetr_v2, "CSPRep"),
                                         (dfine_n, "RepNCSPELAN4"), (dfine_s, "RepNCSPELAN4")])
def test_encoder_equals_transformers(make, fusion):
    config, hf, backbone, neck, _ = build_pair(make)
    assert neck.fusion == fusion
    images = torch.rand(2, 3, 96, 160) * 2 - 1   # non-square, not 640, batch of 2 (multiples of 32)
    with torch.no_grad():
        feats = hf.model.backbone.model(images).feature_maps
        projected = [proj(f) for proj, f in zip(hf.model.encoder_input_proj, feats)]
        expected = hf.model.encoder(projected).last_hidden_state
        got = neck(backbone(images))
    assert len(expected) == len(got) == len(config.encoder_in_channels)
    for ref, (name, value) in zip(expected, got.items()):
        assert ref.abs().mean() > 1e-2
        torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
        spec = neck.output_shape()[name]
        assert value.shape[1:] == (spec.channels, 96 // spec.stride, 160 // spec.stride)


def test_position_embedding_equals_transformers_for_non_square_grids():
    for h, w, dim in [(3, 5, 32), (7, 4, 64), (20, 20, 256)]:
        ref = build_2d_sinusoidal_position_embedding(h, w, dim, 10000.0)
        torch.testing.assert_close(sincos_position_embedding_2d(h, w, dim, 10000.0)[0], ref)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding_2d(2, 2, 30)


def test_eval_size_cache_gives_the_same_outputs_and_other_sizes_still_work():
    shapes = {"c3": ShapeSpec(8, 8), "c4": ShapeSpec(16, 16), "c5": ShapeSpec(24, 32)}
    torch.manual_seed(0)
    plain = HybridEncoder(input_shapes=shapes, hidden_dim=16, num_heads=2, ffn_dim=32).eval()
    cached = HybridEncoder(input_shapes=shapes, hidden_dim=16, num_heads=2, ffn_dim=32,
                           eval_size=(96, 160)).eval()
    cached.load_state_dict(plain.state_dict())   # the cache is not part of the state dict
    for h, w in [(96, 160), (64, 64)]:
        feats = {n: torch.randn(2, s.channels, h // s.stride, w // s.stride) for n, s in shapes.items()}
        with torch.no_grad():
            for a, b in zip(plain(feats).values(), cached(feats).values()):
                torch.testing.assert_close(a, b)


def test_sizes_that_are_not_multiples_of_32_and_output_shape():
    shapes = {"c3": ShapeSpec(8, 8), "c4": ShapeSpec(16, 16), "c5": ShapeSpec(24, 32)}
    for fusion in ("CSPRep", "RepNCSPELAN4"):
        neck = HybridEncoder(input_shapes=shapes, hidden_dim=16, num_heads=2, ffn_dim=32,
                             fusion=fusion, expansion=0.5).eval()
        h, w = 100, 75   # ceil sizes 13x10, 7x5, 4x3: the 2x upsample needs the size fallback
        feats = {n: torch.randn(2, s.channels, -(-h // s.stride), -(-w // s.stride))
                 for n, s in shapes.items()}
        with torch.no_grad():
            out = neck(feats)
        assert list(out) == ["p3", "p4", "p5"] == list(neck.output_shape())
        for value, feat in zip(out.values(), feats.values()):
            assert value.shape == (2, 16, *feat.shape[-2:])


def test_encoder_converter_names_leftover_and_missing_keys():
    config, hf, _, _, converted = build_pair(dfine_n)
    state = hf.state_dict()
    assert sum(k.startswith("neck.") for k in converted) == len(
        [k for k in state if k.startswith(hf_backbones.ENCODER_PREFIXES)])
    extra = dict(state, **{"model.encoder.fpn_blocks.0.conv5.conv.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"left over.*model\.encoder\.fpn_blocks\.0\.conv5"):
        hf_backbones.convert_encoder(extra, config)
    gone = "model.encoder.pan_blocks.0.csp_rep2.bottlenecks.0.conv2.conv.weight"
    with pytest.raises(ConversionError, match=r"missing.*pan_blocks\.0\.csp2\.blocks\.0\.conv1x1\.conv"):
        hf_backbones.convert_encoder({k: v for k, v in state.items() if k != gone}, config)


def test_config_errors():
    config, _ = dfine_n()
    config.activation_function = "relu"   # transformers' D-FINE keeps SiLU in RepNCSPELAN4
    with pytest.raises(ConversionError, match="activation_function"):
        hf_backbones.encoder_config(config)
    config, _ = rtdetr_v1()
    config.normalize_before = True
    with pytest.raises(ConversionError, match="normalize_before"):
        hf_backbones.encoder_config(config)
    config, _ = rtdetr_v1()
    config.encoder_in_channels = [64, 128]
    with pytest.raises(ConversionError, match="encoder_in_channels"):
        hf_backbones.encoder_config(config)
    shapes = {"c4": ShapeSpec(8, 16), "c5": ShapeSpec(8, 32)}
    with pytest.raises(ValueError, match="attention_levels"):
        HybridEncoder(input_shapes=shapes, attention_levels=["c3"])
    with pytest.raises(ValueError, match="fusion"):
        HybridEncoder(input_shapes=shapes, fusion="ELAN")
