"""Matcher (vs torchvision's), crowd / ignore handling, and balanced sampler counts."""

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection._utils import Matcher as TVMatcher

from detkit.models.matchers import IGNORE, NEGATIVE, Matcher, box_ioa, match_boxes, split_ignored
from detkit.models.sampling import sample_balanced


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_equals_torchvision(low_quality):
    g = torch.Generator().manual_seed(0)
    quality = torch.rand(6, 200, generator=g) * 0.9
    quality[2, 17] = quality[2, 50] = 0.95  # a tie for the best anchor of gt 2
    ours = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(quality.clone())
    theirs = TVMatcher(0.7, 0.3, allow_low_quality_matches=low_quality)(quality.clone())
    assert torch.equal(ours, theirs)
    assert {NEGATIVE, IGNORE} == {TVMatcher.BELOW_LOW_THRESHOLD, TVMatcher.BETWEEN_THRESHOLDS}


def test_low_quality_match_gives_every_box_an_anchor():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0]])  # IoU 1/9 and 0
    assert match_boxes(Matcher(0.7, 0.3, True), gt, anchors).tolist() == [0, NEGATIVE]
    assert match_boxes(Matcher(0.7, 0.3, False), gt, anchors).tolist() == [NEGATIVE, NEGATIVE]


def test_box_ioa_hand_computed():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    region = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert torch.allclose(box_ioa(boxes, region), torch.tensor([[1.0], [0.5]]))


def test_crowd_regions_turn_negatives_into_ignored():
    gt = torch.tensor([[100.0, 100.0, 140.0, 140.0]])
    crowd = torch.tensor([[0.0, 0.0, 60.0, 60.0]])
    anchors = torch.tensor([
        [100.0, 100.0, 140.0, 140.0],  # the gt box: positive
        [10.0, 10.0, 30.0, 30.0],      # fully inside the crowd: ignored
        [50.0, 50.0, 70.0, 70.0],      # IoA 0.25 <= 0.5: still a negative
        [200.0, 200.0, 220.0, 220.0],  # far away: negative
    ])
    matches = match_boxes(Matcher(0.5, 0.5), gt, anchors, crowd, crowd_ioa_threshold=0.5)
    assert matches.tolist() == [0, IGNORE, NEGATIVE, NEGATIVE]
    # an image with only crowd boxes: nothing positive, crowd-covered anchors ignored
    matches = match_boxes(Matcher(0.5, 0.5), gt[:0], anchors, crowd)
    assert matches.tolist() == [NEGATIVE, IGNORE, NEGATIVE, NEGATIVE]


def test_split_ignored_uses_iscrowd_and_difficult():
    target = {"boxes": torch.arange(12.0).view(3, 4), "labels": torch.tensor([5, 6, 7]),
              "iscrowd": torch.tensor([False, True, False]), "difficult": torch.tensor([0, 0, 1])}
    boxes, labels, ignore = split_ignored(target)
    assert labels.tolist() == [5] and boxes.tolist() == [[0.0, 1, 2, 3]]
    assert ignore.tolist() == [[4.0, 5, 6, 7], [8.0, 9, 10, 11]]


@pytest.mark.parametrize("num_pos,num_neg,expected", [
    (100, 1000, (64, 192)),  # positives capped at 256 * 0.25, negatives fill up
    (10, 1000, (10, 246)),   # few positives: more negatives
    (10, 20, (10, 20)),      # not enough of either
    (0, 0, (0, 0)),
])
def test_sampler_counts(num_pos, num_neg, expected):
    labels = torch.full((2000,), -1)
    perm = torch.randperm(2000)
    labels[perm[:num_pos]] = 1
    labels[perm[num_pos:num_pos + num_neg]] = 0
    pos, neg = sample_balanced(labels == 1, labels == 0, 256, 0.25)
    assert (pos.numel(), neg.numel()) == expected
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()


def test_sampler_draws_like_torchvision_under_the_same_seed():
    labels = [torch.randint(-1, 2, (500,)), torch.randint(-1, 2, (300,))]
    torch.manual_seed(7)
    tv_pos, tv_neg = BalancedPositiveNegativeSampler(64, 0.25)(labels)
    torch.manual_seed(7)
    for lab, tp, tn in zip(labels, tv_pos, tv_neg):
        pos, neg = sample_balanced(lab == 1, lab == 0, 64, 0.25)
        assert torch.equal(pos, torch.where(tp.bool())[0])
        assert torch.equal(neg, torch.where(tn.bool())[0])


def test_sampler_generator_makes_it_independent_of_global_state():
    labels = torch.randint(-1, 2, (500,))
    picks = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        picks.append(sample_balanced(labels == 1, labels == 0, 64, 0.5, torch.Generator().manual_seed(3)))
    assert torch.equal(picks[0][0], picks[1][0]) and torch.equal(picks[0][1], picks[1][1])
