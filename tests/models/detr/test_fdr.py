"""D-FINE's FDR pieces against transformers' D-FINE functions and modules."""

import pytest
import torch
from transformers import DFineConfig
from transformers.models.d_fine import modeling_d_fine as hf

from detkit.models.detr.fdr import LocationQuality, distance_to_box, distribution_integral, weighting_function


@pytest.mark.parametrize("reg_max,up,reg_scale", [(32, 0.5, 4.0), (8, 0.7, 2.0), (16, -0.3, 6.5)])
def test_weighting_function_equals_transformers(reg_max, up, reg_scale):
    up_t, scale_t = torch.tensor([up]), torch.tensor([reg_scale])
    ours = weighting_function(reg_max, up_t, scale_t)
    ref = hf.weighting_function(reg_max, up_t, scale_t)
    assert ours.shape == (reg_max + 1,)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert ours[reg_max // 2] == 0 and torch.all(ours[1:] > ours[:-1])     # symmetric, increasing


def test_integral_and_distance_to_box_equal_transformers():
    g = torch.Generator().manual_seed(0)
    reg_max = 16
    project = weighting_function(reg_max, torch.tensor([0.5]), torch.tensor([4.0]))
    corners = torch.randn(2, 7, 4 * (reg_max + 1), generator=g) * 3
    integral = hf.DFineIntegral(DFineConfig(max_num_bins=reg_max))
    ours = distribution_integral(corners, project)
    assert torch.allclose(ours, integral(corners, project), atol=1e-6)
    points = torch.cat([torch.rand(2, 7, 2, generator=g), torch.rand(2, 7, 2, generator=g) * 0.5 + 0.05], -1)
    ref = hf.distance2bbox(points, ours, torch.tensor([4.0]))
    assert torch.allclose(distance_to_box(points, ours, torch.tensor([4.0])), ref, atol=1e-6)
    # zero distances give back the box itself (the initial box is the "centre" of every edge)
    same = distance_to_box(points, torch.zeros_like(ours), torch.tensor([4.0]))
    assert torch.allclose(same, points, atol=1e-6)


def test_location_quality_equals_transformers_lqe():
    cfg = DFineConfig(max_num_bins=8, top_prob_values=3, lqe_hidden_dim=16, lqe_layers=3)
    ref = hf.DFineLQE(cfg)
    ours = LocationQuality(top_k=3, hidden_dim=16, num_layers=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ours.load_state_dict({k.replace("reg_conf.", "mlp."): v for k, v in ref.state_dict().items()})
    logits, corners = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 36, generator=g)
    assert torch.allclose(ours(logits, corners), ref(logits, corners), atol=1e-5)
    assert not torch.allclose(ours(logits, corners), logits)
