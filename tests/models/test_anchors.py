"""AnchorGenerator: values equal torchvision's AnchorGenerator; hand-computed cell anchors."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList

from detkit.models.anchors import AnchorGenerator, cell_anchors

FPN_SIZES = [[32], [64], [128], [256], [512]]
STRIDES = [4, 8, 16, 32, 64]


def _tv_anchors(sizes, ratios, padded_hw, grids):
    gen = TVAnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in ratios))
    feats = [torch.zeros(1, 1, h, w) for h, w in grids]
    images = TVImageList(torch.zeros(1, 3, *padded_hw), [padded_hw])
    per_location = gen.num_anchors_per_location()
    return gen(images, feats)[0], [h * w * a for (h, w), a in zip(grids, per_location)]


def test_cell_anchors_hand_computed():
    # size 32, ratio h/w = 0.5: w = 32 / sqrt(.5) = 45.25, h = 22.63 -> half sizes 22.6, 11.3, rounded
    base = cell_anchors([32], [0.5, 1.0, 2.0])
    assert base.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0],
                             [-11.0, -23.0, 11.0, 23.0]]


@pytest.mark.parametrize("sizes,ratios", [([32, 64, 128], [0.5, 1.0, 2.0]), ([24, 40], [0.25, 1.0, 3.0])])
def test_cell_anchors_equal_torchvision(sizes, ratios):
    expected = TVAnchorGenerator((tuple(sizes),), (tuple(ratios),)).cell_anchors[0]
    assert torch.equal(cell_anchors(sizes, ratios), expected)


def test_fpn_anchors_equal_torchvision():
    padded = (256, 320)
    grids = [(padded[0] // s, padded[1] // s) for s in STRIDES]
    ratios = [[0.5, 1.0, 2.0]] * 5
    expected, counts = _tv_anchors(FPN_SIZES, ratios, padded, grids)
    ours = AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=[0.5, 1.0, 2.0], strides=STRIDES)(grids)
    assert [a.shape[0] for a in ours] == counts
    assert torch.equal(torch.cat(ours), expected)
    # location-major order: the anchors of location (row 0, col 1) of P2 follow the 3 of (0, 0)
    assert torch.equal(ours[0][3:6] - ours[0][0:3], torch.tensor([[4.0, 0, 4, 0]] * 3))


def test_stride_mode_torchvision_reproduces_torchvision_rounding():
    # 288 x 352 padded batch: P6 has ceil(9 / 2) = 5 rows, torchvision uses 288 // 5 = 57 as stride
    padded = (288, 352)
    grids = [(math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in STRIDES]
    expected, _ = _tv_anchors(FPN_SIZES, [[1.0]] * 5, padded, grids)
    compat = AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=[1.0], strides=STRIDES,
                             stride_mode="torchvision")(grids)
    assert torch.equal(torch.cat(compat), expected)
    exact = AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=[1.0], strides=STRIDES)(grids)
    assert exact[4][6, 1].item() == 64 - 256  # P6 is 5 x 6: anchor 6 starts row 1, centred at y = 64
    assert compat[4][6, 1].item() == 57 - 256


def test_single_level_many_sizes_c4():
    gen = AnchorGenerator(sizes=[[32, 64, 128, 256, 512]], aspect_ratios=[0.5, 1.0, 2.0], strides=[16])
    assert gen.num_anchors_per_location == [15]
    expected, _ = _tv_anchors([[32, 64, 128, 256, 512]], [[0.5, 1.0, 2.0]], (64, 96), [(4, 6)])
    assert torch.equal(gen([(4, 6)])[0], expected)


def test_stride_mode_switch_after_first_call_and_bad_value():
    grids = [(72, 88), (36, 44), (18, 22), (9, 11), (5, 6)]  # a 288 x 352 batch
    gen = AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=[1.0], strides=STRIDES)
    assert gen(grids)[4][6, 1].item() == 64 - 256
    gen.stride_mode = "torchvision"  # what loading torchvision weights does: not served from the cache
    assert gen(grids)[4][6, 1].item() == 57 - 256
    with pytest.raises(ValueError, match="stride_mode must be one of geometric, torchvision, got 'tv'"):
        AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=[1.0], strides=STRIDES, stride_mode="tv")


def test_level_count_errors():
    with pytest.raises(ValueError, match="one entry per feature level"):
        AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=[1.0], strides=[4, 8])
    gen = AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=[1.0], strides=STRIDES)
    with pytest.raises(ValueError, match="5 levels but got 2"):
        gen([(8, 8), (4, 4)])
