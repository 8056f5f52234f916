"""Optimizer param groups and LR schedules against hand values and torch's own schedulers."""

import math

import pytest
import torch
from torch import nn

from detkit.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from detkit.registry import ConfigError


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(),
                         nn.Linear(4, 2))


def test_weight_decay_excludes_norm_and_bias():
    net = _net()
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(net, 1e-4, 0.0, 0.0)}
    assert set(groups) == {1e-4, 0.0}
    decayed = {id(net[0].weight), id(net[4].weight)}
    assert groups[1e-4] == decayed
    assert groups[0.0] == {id(p) for p in net.parameters()} - decayed


def test_separate_norm_and_bias_decay_and_frozen_params_skipped():
    net = _net()
    net[0].weight.requires_grad_(False)
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(net, 0.1, 0.2, 0.3)}
    assert groups[0.1] == {id(net[4].weight)}
    assert groups[0.2] == {id(net[1].weight), id(net[1].bias), id(net[2].weight), id(net[2].bias)}
    assert groups[0.3] == {id(net[0].bias), id(net[4].bias)}


def test_build_sgd_and_adamw():
    opt = build_optimizer(_net(), {"type": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True,
                                   "weight_decay": 1e-4})
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["lr"] == 0.1 for g in opt.param_groups)
    opt = build_optimizer(_net(), {"type": "AdamW", "lr": 1e-3, "betas": [0.8, 0.9], "weight_decay": 0.05})
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


def test_optimizer_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.optimizer.momentun.*did you mean 'momentum'"):
        build_optimizer(_net(), {"type": "SGD", "lr": 0.1, "momentun": 0.9})
    with pytest.raises(ConfigError, match="unknown optimizer 'Adamw'.*did you mean 'AdamW'"):
        build_optimizer(_net(), {"type": "Adamw", "lr": 0.1})
    with pytest.raises(ConfigError, match="train.scheduler.gama"):
        build_scheduler(build_optimizer(_net(), {"type": "SGD", "lr": 0.1}),
                        {"type": "multistep", "gama": 0.1}, max_iters=10, iters_per_epoch=None)


def test_warmup_multistep_hand_values():
    kw = dict(kind="multistep", max_iters=100, milestones=[50, 80], gamma=0.1, warmup_iters=10,
              warmup_factor=0.001)
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(5, **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(49, **kw) == pytest.approx(1.0)
    assert lr_factor(50, **kw) == pytest.approx(0.1)
    assert lr_factor(80, **kw) == pytest.approx(0.01)


def test_cosine_and_poly_hand_values():
    assert lr_factor(50, kind="cosine", max_iters=100) == pytest.approx(0.5)
    assert lr_factor(100, kind="cosine", max_iters=100, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(25, kind="poly", max_iters=100, power=0.9) == pytest.approx(0.75 ** 0.9)


@pytest.mark.parametrize("kind", ["multistep", "cosine"])
def test_scheduler_matches_torch(kind):
    """Without warmup our per-iteration schedule equals torch's MultiStepLR / CosineAnnealingLR."""
    ours = build_optimizer(_net(), {"type": "SGD", "lr": 0.5})
    ref = build_optimizer(_net(), {"type": "SGD", "lr": 0.5})
    if kind == "multistep":
        sched = build_scheduler(ours, {"type": "multistep", "milestones": [3, 7], "gamma": 0.5},
                                max_iters=12, iters_per_epoch=2)  # milestones in epochs -> 6, 14
        torch_sched = torch.optim.lr_scheduler.MultiStepLR(ref, milestones=[6, 14], gamma=0.5)
    else:
        sched = build_scheduler(ours, {"type": "cosine"}, max_iters=12, iters_per_epoch=None)
        torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=12)
    for _ in range(12):
        assert sched.get_last_lr()[0] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-6, abs=1e-12)
        ours.step(), ref.step(), sched.step(), torch_sched.step()


def test_scheduler_state_roundtrip():
    opt = build_optimizer(_net(), {"type": "SGD", "lr": 1.0})
    sched = build_scheduler(opt, {"type": "poly", "power": 2.0, "warmup_iters": 3}, max_iters=10,
                            iters_per_epoch=None)
    for _ in range(5):
        sched.step()
    opt2 = build_optimizer(_net(), {"type": "SGD", "lr": 1.0})
    sched2 = build_scheduler(opt2, {"type": "poly", "power": 2.0, "warmup_iters": 3}, max_iters=10,
                             iters_per_epoch=None)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched.get_last_lr()[0] == pytest.approx((1 - 5 / 10) ** 2)
    assert not math.isnan(sched2.get_last_lr()[0])


def test_lars_matches_the_layerwise_trust_ratio_formula():
    """Two steps by hand: u = g + wd w, scaled by eta ||w|| / ||u|| for >= 2-D tensors only
    (biases / norm affine are not adapted and, via param_groups, not decayed), then momentum."""
    torch.manual_seed(0)
    net = _net()
    opt = build_optimizer(net, {"type": "LARS", "lr": 0.5, "momentum": 0.9, "weight_decay": 0.01,
                                "eta": 0.02})
    x = torch.randn(4, 3, 3, 3)
    params = [p for p in net.parameters()]
    w = [p.detach().clone() for p in params]
    bufs: list = [None] * len(params)
    for _ in range(2):
        opt.zero_grad()
        net(x).square().sum().backward()
        for i, p in enumerate(params):
            decayed = p.ndim > 1          # _net: conv and linear weights; BN/GN/bias get wd 0
            u = p.grad + 0.01 * w[i] if decayed else p.grad.clone()
            if p.ndim > 1:
                u = u * (0.02 * w[i].norm() / u.norm())
            bufs[i] = u if bufs[i] is None else 0.9 * bufs[i] + u
            w[i] = w[i] - 0.5 * bufs[i]
        opt.step()
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), w[i], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="eta > 0"):
        build_optimizer(_net(), {"type": "LARS", "lr": 0.1, "eta": 0.0})


def test_weight_decay_cosine_schedule_as_dino():
    # DINO's ViT recipe: weight decay 0.04 -> 0.4 along a half cosine over the run, per iteration;
    # a group with decay 0 (norm, bias) stays 0, one with another decay scales in proportion.
    opt = build_optimizer(_net(), {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.04,
                                   "weight_decay_norm": 0.02})
    sched = build_scheduler(opt, {"type": "cosine", "weight_decay_end": 0.4}, max_iters=8,
                            iters_per_epoch=None)
    by_hand = [0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * it / 8)) / 2 for it in range(9)]
    seen = []
    for _ in range(9):
        decays = sorted({g["weight_decay"] for g in opt.param_groups})
        seen.append(decays)
        sched.step()
    assert [d[-1] for d in seen] == pytest.approx(by_hand)
    assert [d[0] for d in seen] == [0.0] * 9                             # bias group
    assert [d[1] for d in seen] == pytest.approx([w / 2 for w in by_hand])  # norm group at half
    assert seen[4][-1] == pytest.approx(0.22)
    # resumed from a state taken mid-run: the same decays from there on
    opt2 = build_optimizer(_net(), {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.04,
                                    "weight_decay_norm": 0.02})
    sched2 = build_scheduler(opt2, {"type": "cosine", "weight_decay_end": 0.4}, max_iters=8,
                             iters_per_epoch=None)
    for _ in range(3):
        sched2.step()
    state = sched2.state_dict()
    for g in opt2.param_groups:          # what a loaded optimizer state holds: iteration 3's decays
        g["weight_decay"] = -1.0
    sched2.load_state_dict(state)
    assert max(g["weight_decay"] for g in opt2.param_groups) == pytest.approx(by_hand[3])
    with pytest.raises(ConfigError, match="weight_decay_end: needs train.optimizer.weight_decay > 0"):
        build_scheduler(build_optimizer(_net(), {"type": "SGD", "lr": 0.1}),
                        {"type": "cosine", "weight_decay_end": 0.4}, max_iters=8, iters_per_epoch=None)
