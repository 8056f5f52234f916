"""HungarianMatcher against a brute-force search over all assignments and against transformers'
RTDetrHungarianMatcher on the same predictions (cxcywh normalised boxes)."""

import itertools

import pytest
import torch
from transformers import RTDetrConfig
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

from detkit.models.matchers import HungarianMatcher


def random_problem(num_targets, num_queries=6, num_classes=5, seed=0):
    """Predictions scattered around the targets (as a trained decoder's are) plus random ones."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_queries, num_classes, generator=g) * 2
    boxes = torch.cat([torch.rand(num_queries, 2, generator=g) * 0.8 + 0.1,
                       torch.rand(num_queries, 2, generator=g) * 0.3 + 0.05], 1)
    target = {"labels": torch.randint(0, num_classes, (num_targets,), generator=g),
              "boxes": torch.cat([torch.rand(num_targets, 2, generator=g) * 0.8 + 0.1,
                                  torch.rand(num_targets, 2, generator=g) * 0.3 + 0.05], 1)}
    near = min(num_targets, num_queries) // 2
    boxes[:near] = target["boxes"][:near] + 0.02 * torch.randn(near, 4, generator=g)
    return logits, boxes, target


def brute_force(cost):
    """The minimal total cost and its pairs over every injective assignment of a [Q, N] matrix."""
    num_q, num_t = cost.shape
    best = (float("inf"), None)
    if num_t <= num_q:
        for queries in itertools.permutations(range(num_q), num_t):
            total = sum(cost[q, t].item() for t, q in enumerate(queries))
            best = min(best, (total, sorted(zip(queries, range(num_t)))), key=lambda x: x[0])
    else:
        for tgts in itertools.permutations(range(num_t), num_q):
            total = sum(cost[q, t].item() for q, t in enumerate(tgts))
            best = min(best, (total, list(zip(range(num_q), tgts))), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("use_focal", [True, False])
def test_matches_brute_force_on_mixed_batch(use_focal):
    matcher = HungarianMatcher(use_focal=use_focal)
    counts = [3, 0, 6, 1, 5]   # an empty image and one with as many targets as queries
    problems = [random_problem(n, seed=i) for i, n in enumerate(counts)]
    logits = torch.stack([p[0] for p in problems])
    boxes = torch.stack([p[1] for p in problems])
    targets = [p[2] for p in problems]
    matches = matcher(logits, boxes, targets)
    assert len(matches) == len(counts)
    for (q, t), (lg, bx, target), n in zip(matches, problems, counts):
        assert q.dtype == t.dtype == torch.int64 and q.numel() == t.numel() == n
        if n == 0:
            continue
        cost = matcher.cost_matrix(lg, bx, target["labels"], target["boxes"])
        best_total, best_pairs = brute_force(cost)
        assert sorted(zip(q.tolist(), t.tolist())) == best_pairs
        assert cost[q, t].sum().item() == pytest.approx(best_total, rel=1e-6)
        assert torch.equal(q, q.sort().values)


def test_more_targets_than_queries_matches_every_query():
    matcher = HungarianMatcher()
    logits, boxes, target = random_problem(5, num_queries=3, seed=7)
    (q, t), = matcher(logits[None], boxes[None], [target])
    cost = matcher.cost_matrix(logits, boxes, target["labels"], target["boxes"])
    assert sorted(zip(q.tolist(), t.tolist())) == brute_force(cost)[1]


def test_cost_terms_follow_the_formulas():
    """One prediction, one target: focal class cost, L1 and -GIoU by hand."""
    matcher = HungarianMatcher(class_weight=2.0, bbox_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)
    logits = torch.tensor([[0.3, -1.2]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    target_boxes = torch.tensor([[0.55, 0.5, 0.2, 0.2]])   # IoU = 0.15 * 0.2 / (0.08 - 0.03) = 0.6
    p = torch.sigmoid(torch.tensor(-1.2)).item()
    focal = 0.25 * (1 - p) ** 2 * -torch.log(torch.tensor(p)).item() \
        - 0.75 * p ** 2 * -torch.log(torch.tensor(1 - p)).item()
    giou = 0.6 - (0.25 * 0.2 - 0.05) / (0.25 * 0.2)          # hull 0.25 x 0.2 = union: GIoU = IoU
    expected = 2 * focal + 5 * 0.05 - 2 * giou
    cost = matcher.cost_matrix(logits, boxes, torch.tensor([1]), target_boxes)
    assert cost.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("use_focal", [True, False])
def test_equals_transformers_matcher(use_focal):
    config = RTDetrConfig(use_focal_loss=use_focal, matcher_class_cost=2.0, matcher_bbox_cost=5.0,
                          matcher_giou_cost=2.0, matcher_alpha=0.25, matcher_gamma=2.0)
    reference = RTDetrHungarianMatcher(config)
    ours = HungarianMatcher(use_focal=use_focal)
    counts = [7, 0, 2, 11]
    problems = [random_problem(n, num_queries=13, num_classes=7, seed=10 + i) for i, n in enumerate(counts)]
    logits = torch.stack([p[0] for p in problems])
    boxes = torch.stack([p[1] for p in problems])
    targets = [p[2] for p in problems]
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    expected = reference({"logits": logits, "pred_boxes": boxes}, hf_targets)
    for (q, t), (eq, et) in zip(ours(logits, boxes, targets), expected):
        assert torch.equal(q, eq) and torch.equal(t, et)


def test_diverged_prediction_is_matched_last():
    matcher = HungarianMatcher()
    logits, boxes, target = random_problem(2, num_queries=3, seed=3)
    boxes[0] = float("nan")
    (q, _), = matcher(logits[None], boxes[None], [target])
    assert 0 not in q.tolist() and q.numel() == 2


def test_all_zero_weights_is_an_error():
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(class_weight=0, bbox_weight=0, giou_weight=0)
