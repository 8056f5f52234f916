"""Momentum update, its cosine schedule, and MoCo's queue."""

import pytest
import torch
from torch import nn

from detkit.ssl.heads import cosine_schedule, make_momentum_copy, momentum_update
from detkit.ssl.moco import enqueue


def test_momentum_update_is_an_exponential_average_of_parameters_only():
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = make_momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.5)
        online[1].running_mean.fill_(7.0)
    before = [p.clone() for p in target.parameters()]
    momentum_update(online, target, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)
    assert torch.equal(target[1].running_mean, torch.zeros(2))   # the target keeps its own statistics


def test_cosine_momentum_schedule():
    assert cosine_schedule(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert cosine_schedule(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    assert cosine_schedule(0.996, 1.0, 100, 100) == pytest.approx(1.0)


def test_queue_enqueue_dequeue_wraps_and_drops_the_oldest():
    queue, pointer = torch.zeros(5, 2), torch.zeros((), dtype=torch.long)
    enqueue(queue, pointer, torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert queue[:, 0].tolist() == [1, 2, 3, 0, 0] and pointer.item() == 3
    enqueue(queue, pointer, torch.tensor([[4.0, 4], [5, 5], [6, 6]]))
    # 1 (the oldest) left; 6 took its place; the next write goes to row 1 (holding 2, now oldest)
    assert queue[:, 0].tolist() == [6, 2, 3, 4, 5] and pointer.item() == 1
    enqueue(queue, pointer, torch.arange(14.0).view(7, 2))        # more keys than rows: the last 5
    assert sorted(queue[:, 0].tolist()) == [4, 6, 8, 10, 12] and pointer.item() == 1
