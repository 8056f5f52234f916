"""Deformable attention: the gather sampler equals grid_sample, the discrete method equals
transformers' RT-DETRv2 core, and the module equals transformers' attention modules."""

import pytest
import torch
from transformers.models.rt_detr_v2 import modeling_rt_detr_v2 as hf_v2

from detkit.models.detr.attention import MSDeformableAttention, deformable_sampling
from detkit.models.detr.position import sine_position_embedding_2d

SHAPES = [(7, 11), (5, 3), (1, 2), (4, 9)]      # odd sizes, one single-row level


def _random_case(points, generator, spread=0.8):
    batch, queries, heads, head_dim = 2, 13, 3, 5
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, total, heads, head_dim, generator=generator)
    # locations well outside [0, 1] on every side as well as inside
    locs = torch.rand(batch, queries, heads, sum(points), 2, generator=generator) * (1 + 2 * spread) - spread
    weights = torch.rand(batch, queries, heads, sum(points), generator=generator).softmax(-1)
    return value, locs, weights


@pytest.mark.parametrize("points", [[2, 2, 2, 2], [1, 4, 3, 2]])
def test_gather_bilinear_equals_grid_sample(points):
    g = torch.Generator().manual_seed(3)
    value, locs, weights = _random_case(points, g)
    # put some points exactly on pixel centres and borders, where floor/ceil choices matter
    locs[0, 0, 0, 0] = torch.tensor([0.5 / 11, 0.5 / 7])
    locs[0, 0, 0, 1] = torch.tensor([0.0, 1.0])
    ref = deformable_sampling(value, SHAPES, locs, weights, points, exportable=False)
    out = deformable_sampling(value, SHAPES, locs, weights, points, exportable=True)
    assert out.shape == (2, 13, 15)
    assert ref.abs().max() > 0.1                   # the case samples real values, not only padding
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_sampling_equals_transformers_v2_core(method):
    points = [1, 4, 3, 2]
    g = torch.Generator().manual_seed(5)
    value, locs, weights = _random_case(points, g)
    ref = hf_v2.multi_scale_deformable_attention_v2(value, SHAPES, locs, weights, points, method)
    for exportable in (False, True):
        out = deformable_sampling(value, SHAPES, locs, weights, points, method=method, exportable=exportable)
        assert (out - ref).abs().max() < 1e-5


def _perturb(module, generator):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("method,offset_scale", [("default", 0.5), ("discrete", 0.8)])
def test_module_equals_transformers_v2_attention(method, offset_scale):
    from transformers import RTDetrV2Config
    cfg = RTDetrV2Config(d_model=24, decoder_attention_heads=3, decoder_n_points=3, num_feature_levels=4,
                         decoder_n_levels=4, decoder_offset_scale=offset_scale, decoder_method=method)
    hf = hf_v2.RTDetrV2MultiscaleDeformableAttention(cfg).eval()
    ours = MSDeformableAttention(embed_dim=24, num_heads=3, num_levels=4, num_points=3,
                                 offset_scale=offset_scale, method=method)
    g = torch.Generator().manual_seed(0)
    _perturb(hf, g)
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "n_points_scale"})
    total = sum(h * w for h, w in SHAPES)
    query, memory = torch.randn(2, 9, 24, generator=g), torch.randn(2, total, 24, generator=g)
    boxes = torch.rand(2, 9, 4, generator=g) * 0.8 + 0.1
    shapes_t = torch.tensor(SHAPES)
    ref, _ = hf(query, encoder_hidden_states=memory, reference_points=boxes[:, :, None],
                spatial_shapes=shapes_t, spatial_shapes_list=SHAPES)
    for exportable in (False, True):
        ours.exportable = exportable
        assert (ours(query, boxes, memory, SHAPES) - ref).abs().max() < 1e-5


def test_per_level_point_init_matches_transformers_dfine():
    from transformers import DFineConfig
    from transformers.models.d_fine import modeling_d_fine as hf_dfine
    cfg = DFineConfig(d_model=32, decoder_attention_heads=4, decoder_n_points=[2, 5, 3], num_feature_levels=3)
    torch.manual_seed(0)
    model = hf_dfine.DFineForObjectDetection(cfg)
    hf_attn = model.model.decoder.layers[0].encoder_attn
    ours = MSDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=[2, 5, 3],
                                 value_proj=False, output_proj=False)
    assert torch.allclose(ours.sampling_offsets.bias, hf_attn.sampling_offsets.bias)
    assert torch.allclose(ours.point_scale, hf_attn.num_points_scale)


def test_bad_point_counts_are_errors():
    with pytest.raises(ValueError, match="one per level"):
        MSDeformableAttention(embed_dim=16, num_heads=2, num_levels=3, num_points=[2, 2])
    with pytest.raises(ValueError, match="discrete"):
        MSDeformableAttention(embed_dim=16, num_heads=2, num_levels=3, method="nearest")


def test_sine_position_embedding_equals_transformers():
    from transformers.models.rt_detr.modeling_rt_detr import build_2d_sinusoidal_position_embedding
    ours = sine_position_embedding_2d(5, 7, 32, temperature=10000.0)
    ref = build_2d_sinusoidal_position_embedding(5, 7, 32, 10000.0)
    assert ours.shape == (35, 32)
    assert torch.equal(ours, ref)
