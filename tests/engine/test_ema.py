"""ModelEMA against the closed-form average."""

import math

import pytest
import torch
from torch import nn

from detkit.engine.ema import ModelEMA


def test_ema_constant_decay_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    w0 = model[0].weight.detach().clone()
    ema = ModelEMA(model, decay=0.9, tau=0)
    w1 = torch.randn_like(w0)
    w2 = torch.randn_like(w0)
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    with torch.no_grad():
        model[0].weight.copy_(w2)
    ema.update(model)
    expected = 0.9 * (0.9 * w0 + 0.1 * w1) + 0.1 * w2
    torch.testing.assert_close(ema.module[0].weight, expected)
    # running statistics are copied, not averaged
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 3.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_decay_ramp():
    ema = ModelEMA(nn.Linear(2, 2), decay=0.999, tau=100)
    ema.updates = 100
    assert ema.current_decay() == pytest.approx(0.999 * (1 - math.exp(-1)))


def test_ema_state_roundtrip():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.5, tau=0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    other = ModelEMA(nn.Linear(2, 2), decay=0.5, tau=0)
    other.load_state_dict(ema.state_dict(), ema.updates)
    assert other.updates == 1
    torch.testing.assert_close(other.module.weight, ema.module.weight)
