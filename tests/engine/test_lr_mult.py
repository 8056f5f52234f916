"""train.optimizer.lr_mult: per-prefix learning rates (the DETR recipes' backbone lr)."""

import pytest
import torch
from torch import nn

from detkit.engine.optim import build_optimizer, build_scheduler
from detkit.registry import ConfigError


def _net():
    net = nn.Module()
    net.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net.backbone_extra = nn.Linear(4, 4)     # shares the prefix's text, not its module
    net.head = nn.Linear(4, 2)
    return net


def _lr_of(opt, param):
    return next(g["lr"] for g in opt.param_groups if any(p is param for p in g["params"]))


def test_backbone_parameters_train_at_the_multiplied_lr_through_warmup():
    net = _net()
    opt = build_optimizer(net, {"type": "AdamW", "lr": 1e-3, "weight_decay": 1e-4,
                                "lr_mult": {"backbone": 0.1}})
    sched = build_scheduler(opt, {"type": "cosine", "warmup_iters": 10, "warmup_factor": 0.5},
                            max_iters=100, iters_per_epoch=None)
    assert _lr_of(opt, net.backbone[0].weight) == pytest.approx(0.5e-4)
    assert _lr_of(opt, net.backbone[1].weight) == pytest.approx(0.5e-4)      # norm group too
    assert _lr_of(opt, net.backbone_extra.weight) == pytest.approx(0.5e-3)   # not under backbone.
    assert _lr_of(opt, net.head.weight) == pytest.approx(0.5e-3)
    for _ in range(10):
        sched.step()
    ratio = _lr_of(opt, net.backbone[0].weight) / _lr_of(opt, net.head.weight)
    assert ratio == pytest.approx(0.1)
    # weight decay exclusion still applies inside the backbone
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(net.backbone[1].weight)] == 0.0 and wd[id(net.backbone[0].weight)] == 1e-4


def test_longest_prefix_wins():
    net = _net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 1.0, "lr_mult": {"backbone": 0.1, "backbone.1": 0.5}})
    assert _lr_of(opt, net.backbone[0].weight) == pytest.approx(0.1)
    assert _lr_of(opt, net.backbone[1].bias) == pytest.approx(0.5)


def test_a_prefix_that_names_no_parameter_is_an_error():
    with pytest.raises(ConfigError, match=r"lr_mult\.backbon.*did you mean"):
        build_optimizer(_net(), {"type": "SGD", "lr": 1.0, "lr_mult": {"backbon": 0.1}})
    with pytest.raises(ConfigError, match="lr_mult"):
        build_optimizer(_net(), {"type": "SGD", "lr": 1.0, "lr_mult": {"backbone": "low"}})


def test_without_lr_mult_the_groups_are_unchanged():
    net = _net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 0.2, "weight_decay": 1e-4})
    assert all(g["lr"] == 0.2 for g in opt.param_groups)
    assert len(opt.param_groups) == 2
    torch.testing.assert_close(torch.tensor(len(list(net.parameters()))),
                               torch.tensor(sum(len(g["params"]) for g in opt.param_groups)))
