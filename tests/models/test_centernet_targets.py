"""CenterNet targets: CornerNet radius, gaussian splats, crowd handling, render -> decode round trip."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from detkit.models.centernet_targets import decode_heatmap, gaussian_radius, render_targets, splat_gaussians

# (h, w) in cells -> radius, computed by hand (4 decimals) from the three CornerNet cases, o = 0.7.
# "cornernet": the released code's (b + sqrt(b^2 - 4ac)) / 2; e.g. 20 x 10: s = 30, wh = 200,
#   case 3 = (-2*.7*30 + sqrt((2*.7*30)^2 + 16*.7*.3*200)) / 2 = (-42 + sqrt(2436)) / 2 = 3.6779
#   (cases 1, 2 give 28.77 and 55.69).
# "corrected": the roots bounding r; 20 x 10: case 1 (30 - sqrt(900 - 60/.17*.4))/2 = 1.2265,
#   case 2 (60 - sqrt(3600 - 960)) / 8 = 1.0774, case 3 sqrt(2436)-42 / 5.6 = 1.3136 -> 1.0774.
RADIUS_TABLE = [
    # h,    w,    cornernet, corrected
    (100.0, 100.0, 27.3320, 8.1670),
    (5.0, 5.0, 1.3666, 0.4083),
    (20.0, 10.0, 3.6779, 1.0774),
    (10.0, 20.0, 3.6779, 1.0774),
    (1.0, 1.0, 0.2733, 0.0817),
]


@pytest.mark.parametrize("h,w,cornernet,corrected", RADIUS_TABLE)
def test_radius_matches_hand_computed_table(h, w, cornernet, corrected):
    hh, ww = torch.tensor([h]), torch.tensor([w])
    assert gaussian_radius(hh, ww, 0.7, "cornernet").item() == pytest.approx(cornernet, abs=1e-3)
    assert gaussian_radius(hh, ww, 0.7, "corrected").item() == pytest.approx(corrected, abs=1e-3)


def test_corrected_radius_is_the_iou_bound():
    """Shifting both corners of a box by the corrected r in the binding case gives IoU == 0.7."""
    for h, w in [(40.0, 40.0), (30.0, 12.0), (7.0, 19.0)]:
        r = gaussian_radius(torch.tensor([h]), torch.tensor([w]), 0.7, "corrected").item()
        box = torch.tensor([[0.0, 0.0, w, h]])
        candidates = {  # the three CornerNet cases
            "translate": torch.tensor([[r, r, w + r, h + r]]),
            "shrink": torch.tensor([[r, r, w - r, h - r]]),
            "grow": torch.tensor([[-r, -r, w + r, h + r]]),
        }
        ious = {k: box_iou(box, b).item() for k, b in candidates.items()}
        assert min(ious.values()) == pytest.approx(0.7, abs=1e-4)
        assert all(v >= 0.7 - 1e-4 for v in ious.values())


def _reference_radius(h: float, w: float, o: float = 0.7) -> float:
    """The released CenterNet code's radius: min over the three cases of (b + sqrt(b^2 - 4ac)) / 2."""
    cases = [(1, h + w, w * h * (1 - o) / (1 + o)), (4, 2 * (h + w), (1 - o) * w * h),
             (4 * o, -2 * o * (h + w), (o - 1) * w * h)]
    return min((b + math.sqrt(b * b - 4 * a * c)) / 2 for a, b, c in cases)


@pytest.mark.parametrize("side,ceil_r,float_r", [(7.2, 2, 1), (3.3, 1, 0), (8.0, 2, 2)])
def test_radius_is_taken_on_ceiled_box_sizes(side, ceil_r, float_r):
    # the reference draws int(gaussian_radius((ceil(h), ceil(w)))): 7.2 x 7.2 cells -> radius of
    # 8 x 8 = 2.19 -> 2, where the float size gives 1.97 -> 1
    assert int(_reference_radius(math.ceil(side), math.ceil(side))) == ceil_r
    assert int(_reference_radius(side, side)) == float_r
    box = [[8.0, 8.0, 8.0 + 4 * side, 8.0 + 4 * side]]            # stride 4: side x side cells
    target = {"boxes": torch.tensor(box), "labels": torch.tensor([0])}
    for mode, radius in (("ceil", ceil_r), ("float", float_r)):
        heat = render_targets([target], [(64, 64)], (16, 16), 1, 4, radius_sizes=mode).heatmap[0, 0]
        row = heat[heat.eq(1).nonzero()[0, 0]]
        assert int((row > 0).sum()) == 2 * radius + 1, mode       # support |dx| <= r
    with pytest.raises(ValueError, match="radius_sizes"):
        render_targets([target], [(64, 64)], (16, 16), 1, 4, radius_sizes="round")


def test_bad_radius_arguments():
    with pytest.raises(ValueError, match="radius formula"):
        gaussian_radius(torch.ones(1), torch.ones(1), 0.7, "paper")
    with pytest.raises(ValueError, match="min_overlap"):
        gaussian_radius(torch.ones(1), torch.ones(1), 1.5)


def test_splat_peak_is_exactly_one_and_gaussian():
    heat = torch.zeros(2, 15, 17)
    splat_gaussians(heat, torch.tensor([[6, 5]]), torch.tensor([3]), torch.tensor([1]))
    assert heat[1, 5, 6].item() == 1.0
    assert heat.max().item() == 1.0 and heat[0].abs().sum() == 0
    sigma = 7 / 6  # (2r + 1) / 6
    assert heat[1, 5, 8].item() == pytest.approx(math.exp(-4 / (2 * sigma ** 2)), rel=1e-5)
    assert heat[1, 3, 7].item() == pytest.approx(math.exp(-5 / (2 * sigma ** 2)), rel=1e-5)
    assert heat[1, 5, 9].item() > 0 and heat[1, 5, 10].item() == 0  # support |dx| <= r
    assert heat[1, 9, 6].item() == 0
    assert torch.equal(heat[1, :, :6], heat[1, :, 7:13].flip(-1))   # symmetric around x = 6


def test_overlapping_objects_keep_the_max():
    centers, radii = torch.tensor([[5, 5], [8, 6]]), torch.tensor([4, 2])
    both = splat_gaussians(torch.zeros(3, 12, 12), centers, radii, torch.tensor([2, 2]))
    a = splat_gaussians(torch.zeros(3, 12, 12), centers[:1], radii[:1], torch.tensor([2]))
    b = splat_gaussians(torch.zeros(3, 12, 12), centers[1:], radii[1:], torch.tensor([2]))
    assert torch.equal(both, torch.maximum(a, b))
    assert both[2, 5, 5] == 1 and both[2, 6, 8] == 1
    assert (both > a).any() and (both > b).any()       # neither splat dominates everywhere
    other = splat_gaussians(torch.zeros(3, 12, 12), centers, radii, torch.tensor([0, 1]))
    assert torch.equal(other[0], a[2]) and torch.equal(other[1], b[2])  # classes stay apart


def _dense_maps(t, batch, height, width):
    """Scatter the per-object wh / offset targets into dense [B,2,H,W] maps (as a prediction)."""
    maps = []
    for values in (t.wh, t.offset):
        dense = torch.zeros(batch * height * width, 2)
        dense[t.indices] = values
        maps.append(dense.view(batch, height, width, 2).permute(0, 3, 1, 2))
    return maps


def test_render_then_decode_gives_back_the_boxes():
    stride, size = 4, (96, 128)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 16.0],       # top-left corner
                          [100.0, 70.0, 128.0, 96.0],   # bottom-right corner
                          [30.5, 10.25, 77.0, 60.0],    # sub-cell coordinates
                          [-10.0, 40.0, 12.0, 90.0],    # leaves the image: clipped to x1 = 0
                          [64.0, 0.0, 140.0, 30.0]])    # clipped to x2 = 128
    labels = torch.tensor([0, 1, 2, 0, 1])
    targets = [{"boxes": boxes, "labels": labels},
               {"boxes": boxes[2:3] + 3, "labels": labels[2:3]}]
    t = render_targets(targets, [size, size], (24, 32), 3, stride)
    assert t.num_objects == 6
    wh, off = _dense_maps(t, 2, 24, 32)
    scores, out_labels, out_boxes = decode_heatmap(t.heatmap, wh, off, stride, k=100)
    expected = boxes.clone()
    expected[:, 0::2] = expected[:, 0::2].clamp(0, size[1])
    expected[:, 1::2] = expected[:, 1::2].clamp(0, size[0])
    for b, (exp_boxes, exp_labels) in enumerate([(expected, labels), (expected[2:3] + 3, labels[2:3])]):
        keep = scores[b] == 1
        assert keep.sum() == len(exp_boxes)
        iou = box_iou(exp_boxes, out_boxes[b][keep])
        best, match = iou.max(1)
        assert (best > 0.99).all(), best
        assert torch.equal(out_labels[b][keep][match], exp_labels)
    assert (scores[scores < 1] < 1).all()


def test_crowd_and_difficult_boxes_are_not_positives():
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 0, 2]),
              "iscrowd": torch.tensor([True, False, False]),
              "difficult": torch.tensor([False, False, True])}
    t = render_targets([target], [(64, 64)], (16, 16), 3, 4)
    assert t.num_objects == 1 and t.heatmap[0, 1].sum() == 0 and t.heatmap[0, 2].sum() == 0
    assert t.heatmap[0, 0, 13, 13] == 1
    assert t.ignore[0, 1, 2:10, 2:10].all() and t.ignore[0, 1].sum() == 64   # cells of 8..40 px
    assert t.ignore[0, 2, :3, :3].all() and not t.ignore[0, 0].any()
    off = render_targets([target], [(64, 64)], (16, 16), 3, 4, ignore_crowd_regions=False)
    assert not off.ignore.any()


def test_empty_and_degenerate_targets():
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    flat = {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([0])}
    t = render_targets([empty, flat], [(32, 32), (32, 32)], (8, 8), 2, 4)
    assert t.num_objects == 0 and t.heatmap.sum() == 0
    assert t.wh.shape == (0, 2) and t.offset.shape == (0, 2) and t.indices.shape == (0,)
    with pytest.raises(ValueError, match="labels"):
        render_targets([{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([2])}],
                       [(32, 32)], (8, 8), 2, 4)


def test_decode_ignores_padding_cells_and_picks_local_maxima():
    heat = torch.zeros(1, 2, 8, 8)
    heat[0, 0, 2, 2], heat[0, 0, 2, 3] = 0.9, 0.8   # 0.8 is not a 3x3 peak
    heat[0, 1, 6, 6] = 0.95                          # inside the padding of a 5x5-cell image
    wh, off = torch.ones(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
    scores, labels, boxes = decode_heatmap(heat, wh, off, 4, k=3, valid_sizes=[(5, 5)])
    assert scores.tolist()[0][0] == pytest.approx(0.9) and scores[0, 1:].eq(0).all()
    assert labels[0, 0] == 0
    assert boxes[0, 0].tolist() == [6.0, 6.0, 10.0, 10.0]
