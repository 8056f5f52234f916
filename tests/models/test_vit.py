"""detkit ViT against transformers' Dinov2Model, Dinov2WithRegistersModel, RfDetrDinov2Backbone
and LwDetrViTBackbone (random weights from tiny configs, converted by convert/hf_vit.py), windowed
attention against a loop over windows, and the converter's strictness."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from detkit.models.backbones.vit import ViT, WindowGridError, window_partition  # noqa: E402
from detkit.models.convert.hf_vit import convert_vit, read_dinov2_folder, vit_backbone_config  # noqa: E402
from detkit.models.convert.transformers import ConversionError, HFConfig  # noqa: E402

TOL = 1e-5


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (transformers initialises LayerScale to 1 and biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _detkit_vit(state: dict, config, **target) -> ViT:
    node = dict(vit_backbone_config(config), **target)
    node.pop("type")
    vit = ViT(**node).eval()
    converted = convert_vit(state, config, prefix="", target=target or None)
    vit.load_state_dict(converted, strict=True)
    return vit


def _images(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _dinov2_reference(model, x: torch.Tensor, stages: list[int], prefix: int, patch: int) -> dict:
    """Dinov2Backbone's recipe on Dinov2Model: final layernorm of hidden_states[i], patches as a map."""
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
    return {f"stage{i}": model.layernorm(hidden[i])[:, prefix:].reshape(2, gh, gw, -1).permute(0, 3, 1, 2)
            for i in stages}


def _assert_close(ours: dict, ref: dict) -> float:
    assert list(ours) == list(ref)
    worst = 0.0
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        worst = max(worst, (ours[k] - ref[k]).abs().max().item())
    assert worst < TOL, worst
    return worst


# sizes: the pretraining grid (no interpolation), a larger non-square grid, a smaller one
# (downsampling, where antialias matters) and a size that is not a multiple of the patch
@pytest.mark.parametrize("size", [(56, 56), (70, 98), (42, 42), (60, 75)])
@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_model_parity(size, swiglu):
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                                    patch_size=14, use_swiglu_ffn=swiglu, out_indices=[1, 3])
    model = _perturb(transformers.Dinov2Model(cfg))
    vit = _detkit_vit(model.state_dict(), cfg)
    x = _images(*size)
    with torch.no_grad():
        ours = vit(x)
    _assert_close(ours, _dinov2_reference(model, x, [1, 3], 1, 14))
    assert {k: (v.shape[1], 14) for k, v in ours.items()} == {
        k: (s.channels, s.stride) for k, s in vit.output_shape().items()}


@pytest.mark.parametrize("size", [(56, 56), (84, 70), (42, 42)])
def test_dinov2_with_registers_parity(size):
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 image_size=56, patch_size=14, num_register_tokens=3)
    model = _perturb(transformers.Dinov2WithRegistersModel(cfg))
    vit = _detkit_vit(model.state_dict(), cfg)
    assert vit.pos_embed_antialias and vit.num_prefix == 4
    x = _images(*size)
    with torch.no_grad():
        ours = vit(x)
    _assert_close(ours, _dinov2_reference(model, x, [2], 4, 14))


def _rfdetr_backbone(num_windows: int, seed: int = 0):
    cfg = transformers.RfDetrDinov2Config(hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
                                          image_size=56, num_windows=num_windows, out_indices=[1, 2, 4])
    return cfg, _perturb(transformers.RfDetrDinov2Backbone(cfg), seed)


@pytest.mark.parametrize("num_windows,side", [(2, 56), (2, 112), (3, 84), (1, 70)])
def test_rfdetr_windowed_backbone_parity(num_windows, side):
    cfg, model = _rfdetr_backbone(num_windows)
    vit = _detkit_vit(model.state_dict(), cfg)
    # transformers' rule: blocks before the deepest output window, except the output blocks
    assert len(vit.blocks) == 4
    expected = [True, False, False, True] if num_windows > 1 else [False] * 4
    assert [b.windowed for b in vit.blocks] == expected
    x = _images(side, side)
    with torch.no_grad():
        ref = dict(zip(["stage1", "stage2", "stage4"], model(x).feature_maps))
        ours = vit(x)
    _assert_close(ours, ref)


def test_rfdetr_non_square_grid_is_a_true_partition():
    """transformers' RF-DETR partition scrambles non-square grids; detkit's windows stay local:
    on a 4x6 grid its output equals the same blocks run window by window on the image itself."""
    cfg, model = _rfdetr_backbone(2)
    vit = _detkit_vit(model.state_dict(), cfg)
    x = _images(56, 84)
    with torch.no_grad():
        ours = vit(x)["stage1"]
    # block 0 is windowed and stage1 its output: each 2x3 window saw only itself and its own CLS
    # copy (with the full image's position embeddings)
    vit_single = _detkit_vit(model.state_dict(), cfg, windows_per_side=1)
    with torch.no_grad():
        tokens, grid = vit_single.embed(x)
        cls, patches = tokens[:, :1], tokens[:, 1:].reshape(2, 4, 6, -1)
        for r in (0, 2):
            for c in (0, 3):
                seq = torch.cat([cls, patches[:, r:r + 2, c:c + 3].reshape(2, 6, -1)], 1)
                out = vit.norm(vit.blocks[0](seq, 1))[:, 1:].reshape(2, 2, 3, -1).permute(0, 3, 1, 2)
                assert (ours[:, :, r:r + 2, c:c + 3] - out).abs().max() < TOL
    with torch.no_grad():
        scrambled = model(x).feature_maps[0]
    assert (scrambled - ours).abs().max() > 1e-3   # the documented difference


def _lwdetr_backbone(seed: int = 0):
    cfg = transformers.LwDetrViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                       pretrain_image_size=64, image_size=64, num_windows=4,
                                       window_block_indices=[0, 2], out_indices=[1, 3, 4])
    return cfg, _perturb(transformers.LwDetrViTBackbone(cfg), seed)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (32, 32), (128, 64)])
def test_lwdetr_vit_parity(size):
    cfg, model = _lwdetr_backbone()
    vit = _detkit_vit(model.state_dict(), cfg)
    assert vit.patch_size == 16 and vit.cls_token is None and vit.norm is None
    assert vit.blocks[0].attn.k_proj.bias is None
    x = _images(*size)
    with torch.no_grad():
        ref = dict(zip(["stage1", "stage3", "stage4"], model(x).feature_maps))
        ours = vit(x)
    _assert_close(ours, ref)
    assert {k: s.stride for k, s in vit.output_shape().items()} == {k: 16 for k in ref}


def test_windowed_block_equals_loop_over_windows_and_global_block_equals_plain_vit():
    torch.manual_seed(0)
    kw = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, out_indices=[1, 2], pretrain_image_size=32,
              cls_token=False, final_norm=False)
    windowed = _perturb(ViT(**kw, windows_per_side=2, window_block_indices=[0]))
    plain = ViT(**kw).eval()
    plain.load_state_dict(windowed.state_dict())
    x = _images(32, 48)   # a 4x6 grid: 2x3 tokens per window
    with torch.no_grad():
        out = windowed(x)
        tokens, grid = plain.embed(x)
        grid_tokens = tokens.reshape(2, 4, 6, -1)
        expected = torch.empty_like(grid_tokens)
        for r in (0, 2):
            for c in (0, 3):
                window = grid_tokens[:, r:r + 2, c:c + 3].reshape(2, 6, -1)
                expected[:, r:r + 2, c:c + 3] = plain.blocks[0](window, 1).reshape(2, 2, 3, -1)
        assert (out["stage1"] - expected.permute(0, 3, 1, 2)).abs().max() < TOL
        # the second block is global: across all windows it is the plain block on the whole image
        second = plain.blocks[1](expected.reshape(2, 24, -1), 1).reshape(2, 4, 6, -1).permute(0, 3, 1, 2)
        assert (out["stage2"] - second).abs().max() < TOL
        # and windows change the result (the test would pass for a windowless model otherwise)
        assert (plain(x)["stage1"] - out["stage1"]).abs().max() > 1e-3


def test_window_partition_order():
    grid = torch.arange(4 * 6).reshape(1, 24, 1).float()
    windows = window_partition(grid, (4, 6), 2)
    assert windows[1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]     # window (0, 1): top right
    assert windows[2, :, 0].tolist() == [12, 13, 14, 18, 19, 20]  # window (1, 0)


def test_bad_window_grid_names_valid_sizes():
    vit = ViT(patch_size=14, embed_dim=32, depth=1, num_heads=2, out_indices=[1], pretrain_image_size=56,
              windows_per_side=2, window_block_indices=[0])
    assert vit.size_divisibility == 28
    with pytest.raises(WindowGridError, match=r"70x84.*5x6 grid.*multiples of 28.*56x84"):
        vit(torch.zeros(1, 3, 70, 84))


def test_config_json_mapping_gives_the_same_config_as_the_object():
    cfg, _ = _rfdetr_backbone(2)
    mapping = HFConfig(json.loads(cfg.to_json_string()))
    assert vit_backbone_config(mapping) == vit_backbone_config(cfg)
    full = transformers.RfDetrConfig(backbone_config=cfg.to_dict(), d_model=32)
    assert vit_backbone_config(HFConfig(json.loads(full.to_json_string()))) == vit_backbone_config(cfg)
    lw, _ = _lwdetr_backbone()
    node = vit_backbone_config(HFConfig(json.loads(lw.to_json_string())))
    assert node["windows_per_side"] == 2 and node["window_block_indices"] == [0, 2] and node["depth"] == 4


def _legacy_names(state: dict) -> dict:
    """The Hub's pre-transformers-5 DINOv2 names (split attention, fused SwiGLU input)."""
    out = {}
    for k, v in state.items():
        k2 = (k.replace("attention.q_proj", "attention.attention.query")
              .replace("attention.k_proj", "attention.attention.key")
              .replace("attention.v_proj", "attention.attention.value")
              .replace("attention.o_proj", "attention.output.dense")
              .replace("mlp.down_proj", "mlp.weights_out"))
        if "mlp.gate_proj" in k:
            out[k.replace("mlp.gate_proj", "mlp.weights_in")] = torch.cat([v, state[k.replace("gate", "up")]])
        elif "mlp.up_proj" not in k:
            out[k2] = v
    return out


def test_converter_reads_legacy_names_and_is_strict():
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                                    use_swiglu_ffn=True)
    state = _perturb(transformers.Dinov2Model(cfg)).state_dict()
    new = convert_vit(state, cfg)
    legacy = convert_vit(_legacy_names(state), cfg)
    assert new.keys() == legacy.keys() and all(torch.equal(new[k], legacy[k]) for k in new)
    # the mask token is skipped on purpose (detection never masks); kept when the target has one
    assert "backbone.mask_token" not in new
    assert "backbone.mask_token" in convert_vit(state, cfg, target={"use_mask_token": True})
    with pytest.raises(ConversionError, match=r"encoder\.layer\.0\.attention\.extra\.weight"):
        convert_vit({**state, "encoder.layer.0.attention.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ConversionError, match=r"missing \['blocks\.1\.norm1\.bias'\]"):
        convert_vit({k: v for k, v in state.items() if k != "encoder.layer.1.norm1.bias"}, cfg)
    with pytest.raises(ConversionError, match="already filled"):
        convert_vit({**state, "encoder.layer.0.attention.attention.query.weight": state[
            "encoder.layer.0.attention.q_proj.weight"]}, cfg)
    with pytest.raises(ConversionError, match="not a ViT detkit converts"):
        vit_backbone_config({"model_type": "vit"})


def test_dinov2_folder_loads_through_weights(tmp_path):
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=42)
    model = _perturb(transformers.Dinov2Model(cfg))
    model.save_pretrained(tmp_path)
    state = read_dinov2_folder(tmp_path)
    assert all(k.startswith("backbone.") for k in state)
    node = vit_backbone_config(cfg)
    node.pop("type")
    vit = ViT(**node, weights=str(tmp_path)).eval()
    x = _images(56, 70)
    with torch.no_grad():
        _assert_close(vit(x), _dinov2_reference(model, x, [2], 1, 14))
    with pytest.raises(ValueError, match="blocks.0.ffn.fc1.weight"):   # a ViT of another shape
        ViT(**dict(node, mlp_ratio=2.0), weights=str(tmp_path))


def test_masked_positions_match_dinov2_bool_masked_pos():
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56)
    model = _perturb(transformers.Dinov2Model(cfg))
    vit = _detkit_vit(model.state_dict(), cfg, use_mask_token=True)
    x = _images(56, 70)
    mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        hidden = model(x, bool_masked_pos=mask, output_hidden_states=True).hidden_states
        ref = {"stage2": model.layernorm(hidden[2])[:, 1:].reshape(2, 4, 5, -1).permute(0, 3, 1, 2)}
        _assert_close(vit(x, masked_positions=mask), ref)
        assert (vit(x)["stage2"] - ref["stage2"]).abs().max() > 1e-3


def test_converted_rfdetr_vit_trains_every_parameter_from_a_registry_config():
    """Detection configs build no unused parameter (DDP runs with find_unused_parameters off):
    no mask token, no block after the deepest output."""
    from detkit.registry import BACKBONES

    cfg, _ = _rfdetr_backbone(2)
    vit = BACKBONES.build(dict(vit_backbone_config(cfg), drop_path_rate=0.1)).train()
    out = vit(_images(56, 56))
    sum(v.square().mean() for v in out.values()).backward()
    unused = [n for n, p in vit.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_windowed_antialiased_vit_exports_to_onnx(tmp_path):
    """ONNX has no antialiased bicubic: the export resamples with constant matrices, exact for the
    traced size (ONNX Runtime against PyTorch at a size other than the pretraining one)."""
    ort = pytest.importorskip("onnxruntime")
    cfg, model = _rfdetr_backbone(2)
    vit = _detkit_vit(model.state_dict(), cfg)
    x = _images(84, 84)
    path = tmp_path / "vit.onnx"
    with pytest.warns(torch.jit.TracerWarning):
        torch.onnx.export(vit, (x,), str(path), input_names=["images"], opset_version=17, dynamo=False)
    outputs = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = vit(x)
    assert len(outputs) == 3
    for out, ref in zip(outputs, expected.values()):
        assert abs(torch.from_numpy(out) - ref).max() < 1e-4
