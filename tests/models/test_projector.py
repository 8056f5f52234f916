"""detkit RFDETRProjector against transformers' RF-DETR / LW-DETR projectors (random weights,
converted by convert/hf_vit.py), backbone + projector end to end against RfDetrConvEncoder /
LwDetrConvEncoder, output_shape() and the converter's strictness."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.lw_detr import modeling_lw_detr  # noqa: E402
from transformers.models.rf_detr import modeling_rf_detr  # noqa: E402

from detkit.models.backbones.vit import ViT  # noqa: E402
from detkit.models.convert.hf_vit import (  # noqa: E402
    convert_projector,
    convert_vit_parts,
    projector_config,
    vit_backbone_config,
)
from detkit.models.convert.transformers import ConversionError  # noqa: E402
from detkit.models.necks.projector import RFDETRProjector  # noqa: E402
from detkit.structures import ShapeSpec  # noqa: E402

TOL = 1e-5


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BN statistics (transformers starts norms at 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def _rfdetr_config(**kw):
    backbone = dict(model_type="rf_detr_dinov2", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    image_size=56, num_windows=2, out_indices=[1, 2, 4])
    return transformers.RfDetrConfig(backbone_config=backbone, d_model=24, c2f_num_blocks=2, **kw)


def _lwdetr_config(scales, hidden=32):
    backbone = dict(model_type="lw_detr_vit", hidden_size=hidden, num_hidden_layers=3, num_attention_heads=2,
                    pretrain_image_size=64, image_size=64, num_windows=4, window_block_indices=[0],
                    out_indices=[1, 3])
    return transformers.LwDetrConfig(backbone_config=backbone, projector_scale_factors=scales, d_model=24,
                                     c2f_num_blocks=2)


def _build(node: dict, input_shapes=None):
    kwargs = {k: v for k, v in node.items() if k != "type"}
    if input_shapes is not None:
        return RFDETRProjector(input_shapes=input_shapes, **kwargs).eval()
    return ViT(**kwargs).eval()


def _shapes(config) -> dict:
    vit = vit_backbone_config(config)
    return {f"stage{i}": ShapeSpec(vit["embed_dim"], vit["patch_size"]) for i in vit["out_indices"]}


def _maps(n: int, channels: int, h: int, w: int, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, h, w, generator=g) for _ in range(n)]


def _assert_outputs(ours: dict, ref: list, neck: RFDETRProjector, stride: int,
                    size: tuple[int, int]) -> float:
    assert len(ours) == len(ref)
    worst = 0.0
    for (name, out), expected in zip(ours.items(), ref):
        assert out.shape == expected.shape, name
        worst = max(worst, (out - expected).abs().max().item())
        spec = neck.output_shape()[name]
        assert out.shape[1] == spec.channels
        # output stride: input pixels per output pixel (f=0.5 rounds the map up)
        assert -(-size[0] // spec.stride) in (out.shape[-2], out.shape[-2] + 1), (name, spec)
    assert worst < TOL, worst
    return worst


@pytest.mark.parametrize("hw", [(4, 4), (5, 7)])
def test_rfdetr_projector_parity(hw):
    config = _rfdetr_config()
    ref = _perturb(modeling_rf_detr.RfDetrScaleProjector(config))
    state = {f"backbone.projector.{k}": v for k, v in ref.state_dict().items()}
    node = projector_config(config)
    assert node["norm"] == "LN" and node["scale_factors"] == [1.0]
    neck = _build(node, _shapes(config))
    neck.load_state_dict({k.removeprefix("neck."): v for k, v in convert_projector(state, config).items()})
    xs = _maps(3, 32, *hw)
    with torch.no_grad():
        ours = neck(dict(zip(["stage1", "stage2", "stage4"], xs)))
        expected = [ref(tuple(xs))]
    assert list(ours) == ["p4"]
    _assert_outputs(ours, expected, neck, 14, (hw[0] * 14, hw[1] * 14))


@pytest.mark.parametrize("scales,hidden", [([2.0, 1.0, 0.5], 32), ([1.0], 32), ([2.0, 0.5], 520)])
def test_lwdetr_multiscale_projector_parity(scales, hidden):
    config = _lwdetr_config(scales, hidden)
    ref = _perturb(modeling_lw_detr.LwDetrMultiScaleProjector(config))
    state = {f"model.backbone.projector.{k}": v for k, v in ref.state_dict().items()}
    node = projector_config(config)
    assert node["norm"] == "BN"
    neck = _build(node, _shapes(config))
    neck.load_state_dict({k.removeprefix("neck."): v for k, v in convert_projector(state, config).items()})
    xs = _maps(2, hidden, 5, 7)   # odd sizes: the stride-2 level rounds up
    with torch.no_grad():
        ours = neck(dict(zip(["stage1", "stage3"], xs)))
        expected = ref(tuple(xs))
    assert list(ours) == [{2.0: "p3", 1.0: "p4", 0.5: "p5"}[s] for s in scales]
    _assert_outputs(ours, expected, neck, 16, (80, 112))
    assert {k: s.stride for k, s in neck.output_shape().items()} == {
        {2.0: "p3", 1.0: "p4", 0.5: "p5"}[s]: int(16 / s) for s in scales}


def _detkit_parts(config, state):
    converted = convert_vit_parts(state, config)
    vit = _build(vit_backbone_config(config))
    neck = _build(projector_config(config), vit.output_shape())
    assert all(k.startswith(("backbone.", "neck.")) for k in converted)
    vit.load_state_dict({k[9:]: v for k, v in converted.items() if k.startswith("backbone.")})
    neck.load_state_dict({k[5:]: v for k, v in converted.items() if k.startswith("neck.")})
    return vit, neck


def test_rfdetr_backbone_and_projector_end_to_end():
    config = _rfdetr_config()
    encoder = _perturb(modeling_rf_detr.RfDetrConvEncoder(config))
    # as inside RfDetrForObjectDetection, with a decoder key the parts converter must leave alone
    state = {f"model.backbone.{k}": v for k, v in encoder.state_dict().items()}
    state["model.decoder.layers.0.fc1.weight"] = torch.zeros(1)
    vit, neck = _detkit_parts(config, state)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, _ = encoder(x, torch.ones(2, 112, 112, dtype=torch.long))
        ours = neck(vit(x))
    assert (ours["p4"] - expected).abs().max() < TOL


def test_lwdetr_backbone_and_projector_end_to_end():
    config = _lwdetr_config([2.0, 0.5])
    encoder = _perturb(modeling_lw_detr.LwDetrConvEncoder(config))
    state = {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
    vit, neck = _detkit_parts(config, state)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = [f for f, _ in encoder(x, torch.ones(2, 64, 96, dtype=torch.long))]
        ours = neck(vit(x))
    _assert_outputs(ours, expected, neck, 16, (64, 96))


def _legacy_rfdetr_names(state: dict) -> dict:
    """The original RF-DETR repository's projector names (stages.0.0.cv1.bn ...)."""
    out = {}
    for k, v in state.items():
        k = (k.replace("projector.projector_layer.bottlenecks.", "projector.stages.0.0.m.")
             .replace("projector.projector_layer.", "projector.stages.0.0.")
             .replace("projector.layer_norm.", "projector.stages.0.1."))
        k = k.replace(".conv1.conv.", ".cv1.conv.").replace(".conv1.norm.", ".cv1.bn.")
        out[k.replace(".conv2.conv.", ".cv2.conv.").replace(".conv2.norm.", ".cv2.bn.")] = v
    return out


def test_projector_converter_reads_original_names_and_is_strict():
    config = _rfdetr_config()
    state = {f"backbone.projector.{k}": v
             for k, v in _perturb(modeling_rf_detr.RfDetrScaleProjector(config)).state_dict().items()}
    new = convert_projector(state, config)
    legacy = convert_projector(_legacy_rfdetr_names(state), config)
    assert new.keys() == legacy.keys() and all(torch.equal(new[k], legacy[k]) for k in new)
    with pytest.raises(ConversionError, match=r"backbone\.projector\.extra\.weight"):
        convert_projector({**state, "backbone.projector.extra.weight": torch.zeros(1)}, config)
    with pytest.raises(ConversionError, match=r"missing \['levels\.0\.norm\.bias'\]"):
        dropped = "backbone.projector.layer_norm.bias"
        convert_projector({k: v for k, v in state.items() if k != dropped}, config)
    with pytest.raises(ConversionError, match="no projector tensors"):
        convert_projector({}, config)
    with pytest.raises(ConversionError, match="projector_scale_factors"):
        projector_config(_lwdetr_config([]))


def test_projector_rejects_bad_arguments():
    shapes = {"stage1": ShapeSpec(32, 14), "stage2": ShapeSpec(32, 14)}
    with pytest.raises(ValueError, match="scale_factors"):
        RFDETRProjector(input_shapes=shapes, scale_factors=[4.0])
    with pytest.raises(ValueError, match="one stride"):
        RFDETRProjector(input_shapes={**shapes, "stage3": ShapeSpec(32, 28)})
    with pytest.raises(ValueError, match="stage9"):
        RFDETRProjector(input_shapes=shapes, in_features=["stage9"])


def test_original_rfdetr_repository_layout_converts_like_transformers():
    """backbone.0.encoder.encoder.* (split attention names) and backbone.0.projector.stages.*"""
    config = _rfdetr_config()
    encoder = _perturb(modeling_rf_detr.RfDetrConvEncoder(config)).state_dict()
    ours = convert_vit_parts({f"backbone.{k}": v for k, v in encoder.items()}, config)
    original = {}
    for k, v in _legacy_rfdetr_names(encoder).items():
        if k.startswith("projector."):
            original[f"backbone.0.{k}"] = v
        else:
            k = (k.replace("attention.q_proj", "attention.attention.query")
                 .replace("attention.k_proj", "attention.attention.key")
                 .replace("attention.v_proj", "attention.attention.value")
                 .replace("attention.o_proj", "attention.output.dense"))
            original[f"backbone.0.encoder.encoder.{k.removeprefix('backbone.')}"] = v
    converted = convert_vit_parts(original, config)
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)
