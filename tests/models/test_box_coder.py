"""BoxCoder: round trip, hand-computed deltas, and equality with torchvision's BoxCoder."""

import math

import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from detkit.models.box_coder import BoxCoder


def _random_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    wh = torch.rand(n, 2, generator=g) * 100 + 20  # size ratios < 6: below the decode clamp
    return torch.cat([xy, xy + wh], dim=1)


def test_hand_computed_deltas():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[5.0, 0.0, 25.0, 20.0]])  # centre moves +10 in x, width doubles
    deltas = coder.encode(gt, ref)
    expected = torch.tensor([[10 * 10 / 10, 0.0, 5 * math.log(2.0), 0.0]])
    assert torch.allclose(deltas, expected)


def test_round_trip():
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        ref, gt = _random_boxes(500, 0), _random_boxes(500, 1)
        assert torch.allclose(coder.decode(coder.encode(gt, ref), ref), gt, atol=1e-3)


def test_equal_to_torchvision():
    weights = (10.0, 10.0, 5.0, 5.0)
    ours, theirs = BoxCoder(weights), TVBoxCoder(weights)
    ref, gt = _random_boxes(300, 2), _random_boxes(300, 3)
    assert torch.allclose(ours.encode(gt, ref), theirs.encode_single(gt, ref), atol=1e-6)
    deltas = torch.randn(300, 5 * 4)  # class-specific: 5 sets per box
    expected = theirs.decode_single(deltas, ref)
    assert torch.equal(ours.decode(deltas, ref), expected)


def test_scale_clamp():
    coder = BoxCoder()
    ref = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    boxes = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), ref)
    width = boxes[0, 2] - boxes[0, 0]
    assert torch.isfinite(boxes).all()
    assert torch.allclose(width, torch.tensor(1000.0), rtol=1e-4)  # exp(log(1000/16)) * 16
