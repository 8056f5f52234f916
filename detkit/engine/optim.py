"""Optimizers with weight-decay exclusion for norm/bias, and per-iteration LR schedules.

Config (``train.optimizer``)::

    {type: SGD, lr: 0.02, momentum: 0.9, nesterov: false, weight_decay: 1.0e-4}
    {type: AdamW, lr: 1.0e-4, betas: [0.9, 0.999], weight_decay: 0.05}
    {type: LARS, lr: 0.3, momentum: 0.9, weight_decay: 1.0e-6, eta: 0.001}    # detkit.engine.lars
    # detkit keys (not passed to torch): weight_decay_norm (default 0.0), weight_decay_bias (0.0),
    # lr_mult: {backbone: 0.1} (parameters whose name starts with a prefix train at lr * factor;
    # the longest matching prefix wins; the DETR recipes' backbone learning rate)

Config (``train.scheduler``), all positions in iterations (= optimizer steps) after the trainer
converted epoch milestones::

    {type: multistep, milestones: [8, 11], gamma: 0.1, warmup_iters: 500, warmup_factor: 0.001}
    {type: cosine, min_lr_ratio: 0.0, warmup_iters: ..., warmup_factor: ...}
    {type: poly, power: 0.9, min_lr_ratio: 0.0, warmup_iters: ..., warmup_factor: ...}
    # any type: weight_decay_end: 0.4 -> the weight decay follows a cosine from the optimizer's
    # weight_decay to this value over the run (DINO's 0.04 -> 0.4); groups with another decay
    # (weight_decay_norm / _bias) scale by the same factor, decay 0 stays 0
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch import nn

from ..registry import ConfigError, check_kwargs, closest
from .lars import LARS

__all__ = ["build_optimizer", "param_groups", "WarmupScheduler", "build_scheduler", "lr_factor"]

OPTIMIZERS = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW, "LARS": LARS}
SCHEDULES = ("multistep", "cosine", "poly")
# nn.GroupNorm/LayerNorm/BatchNorm*/SyncBatchNorm/FrozenBN all have "norm" semantics: their
# affine parameters should not be pulled towards zero (it would fight the normalisation).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    # Name fallback for user norm layers that do not subclass torch's (e.g. a custom RMSNorm).
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith(("Norm", "Norm1d", "Norm2d", "BN"))


def _lr_factor_of(name: str, lr_mult: dict[str, float]) -> float:
    best = max((p for p in lr_mult if name == p or name.startswith(p.rstrip(".") + ".")),
               key=len, default=None)
    return 1.0 if best is None else float(lr_mult[best])


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float,
                 weight_decay_bias: float, lr_mult: dict[str, float] | None = None,
                 base_lr: float | None = None) -> list[dict]:
    """Split trainable parameters into groups by their weight decay (and learning rate).

    A parameter of a normalisation layer gets ``weight_decay_norm``; any other parameter named
    ``bias`` (or 1-D, e.g. a learnable scale) gets ``weight_decay_bias``; the rest ``weight_decay``.
    With ``lr_mult`` ({name prefix: factor}) and ``base_lr``, a group also carries ``lr`` =
    ``base_lr`` times the factor of the longest prefix of the parameter's name.
    Shared parameters are counted once.
    """
    groups: dict[tuple[float, float], list] = {}
    seen: set[int] = set()
    lr_mult = dict(lr_mult or {})
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if _is_norm(module):
                wd = weight_decay_norm
            elif name == "bias" or param.ndim <= 1:
                wd = weight_decay_bias
            else:
                wd = weight_decay
            full = f"{module_name}.{name}" if module_name else name
            groups.setdefault((float(wd), _lr_factor_of(full, lr_mult)), []).append(param)
    out = []
    for (wd, factor), params in groups.items():
        group = {"params": params, "weight_decay": wd}
        if lr_mult and base_lr is not None:
            group["lr"] = base_lr * factor
        out.append(group)
    return out


def build_optimizer(model: nn.Module, cfg: dict, path: str = "train.optimizer") -> torch.optim.Optimizer:
    """SGD, AdamW or LARS over :func:`param_groups`; other keys are the torch optimizer's arguments."""
    cfg = dict(cfg)
    name = cfg.pop("type", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"{path}.type: unknown optimizer {name!r}{closest(str(name), OPTIMIZERS)}; "
                          f"choose one of {', '.join(OPTIMIZERS)}")
    wd = float(cfg.get("weight_decay", 0.0))
    wd_norm = float(cfg.pop("weight_decay_norm", 0.0))
    wd_bias = float(cfg.pop("weight_decay_bias", 0.0))
    lr_mult = cfg.pop("lr_mult", None) or {}
    if not isinstance(lr_mult, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in lr_mult.values()):
        raise ConfigError(f"{path}.lr_mult: expected a mapping of parameter-name prefixes to "
                          f"numbers, e.g. {{backbone: 0.1}}, got {lr_mult!r}")
    if "lr" not in cfg:
        raise ConfigError(f"{path}: missing 'lr'")
    cls = OPTIMIZERS[name]
    check_kwargs(cls, {"params": None, **cfg}, path, name)
    if "betas" in cfg:
        cfg["betas"] = tuple(float(b) for b in cfg["betas"])
    names = [n for n, _ in model.named_parameters()]
    for prefix in lr_mult:
        if not any(n == prefix or n.startswith(str(prefix).rstrip(".") + ".") for n in names):
            raise ConfigError(f"{path}.lr_mult.{prefix}: no parameter name starts with {prefix!r}"
                              f"{closest(str(prefix), sorted({n.split('.')[0] for n in names}))}")
    groups = param_groups(model, wd, wd_norm, wd_bias, lr_mult, float(cfg["lr"]))
    if not groups:
        raise ConfigError(f"{path}: the model has no trainable parameters")
    try:
        return cls(groups, **cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path} ({name}): {e}") from e


def lr_factor(it: int, *, kind: str, max_iters: int, milestones: Sequence[int] = (),
              gamma: float = 0.1, power: float = 0.9, min_lr_ratio: float = 0.0,
              warmup_iters: int = 0, warmup_factor: float = 0.001) -> float:
    """LR multiplier for iteration ``it`` (0-based, the step about to be taken).

    Linear warmup from ``warmup_factor`` to 1 over ``warmup_iters``, multiplied by the main
    schedule: multistep ``gamma ** (#milestones <= it)``; cosine
    ``r + (1 - r) * (1 + cos(pi * it / max_iters)) / 2``; poly ``r + (1 - r) * (1 - it / max_iters) ** power``
    with ``r = min_lr_ratio``.
    """
    if kind == "multistep":
        main = gamma ** bisect.bisect_right(sorted(milestones), it)
    elif kind == "cosine":
        t = min(it, max_iters) / max(max_iters, 1)
        main = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif kind == "poly":
        t = min(it, max_iters) / max(max_iters, 1)
        main = min_lr_ratio + (1 - min_lr_ratio) * (1 - t) ** power
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    if it < warmup_iters:
        alpha = it / warmup_iters
        main *= warmup_factor * (1 - alpha) + alpha
    return main


class WarmupScheduler:
    """Sets ``lr = base_lr * lr_factor(iter)`` on every param group; :meth:`step` once per iteration.

    Its state is two primitives, so a checkpoint holding it loads with ``weights_only=True``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, max_iters: int,
                 weight_decay_end: float | None = None, **kwargs):
        self.optimizer = optimizer
        self.kind = kind
        self.max_iters = int(max_iters)
        self.kwargs = kwargs
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        # the decays at iteration 0: the schedule's start (kept in the state for an exact resume)
        self.base_wds = [float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
        self.weight_decay_end = None if weight_decay_end is None else float(weight_decay_end)
        self.last_iter = 0
        self._apply()

    def weight_decay_factor(self, it: int) -> float:
        """Multiplier of every group's base decay at iteration ``it``: the largest base decay w0
        goes ``end - (end - w0) * (1 + cos(pi * it / max_iters)) / 2``, the others in proportion."""
        start = max(self.base_wds, default=0.0)
        if self.weight_decay_end is None or start <= 0:
            return 1.0
        t = min(it, self.max_iters) / max(self.max_iters, 1)
        end = self.weight_decay_end
        return (end - (end - start) * 0.5 * (1 + math.cos(math.pi * t))) / start

    def factor(self, it: int) -> float:
        return lr_factor(it, kind=self.kind, max_iters=self.max_iters, **self.kwargs)

    def _apply(self) -> None:
        f = self.factor(self.last_iter)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
        if self.weight_decay_end is not None:
            wd = self.weight_decay_factor(self.last_iter)
            for group, base in zip(self.optimizer.param_groups, self.base_wds):
                group["weight_decay"] = base * wd

    def step(self) -> None:
        self.last_iter += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_iter": self.last_iter, "base_lrs": list(self.base_lrs),
                "base_wds": list(self.base_wds)}

    def load_state_dict(self, state: dict) -> None:
        self.last_iter = int(state["last_iter"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        # the optimizer state loaded before holds the decays of the saved iteration, not the start
        if "base_wds" in state:
            self.base_wds = [float(v) for v in state["base_wds"]]
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, *, max_iters: int,
                    iters_per_epoch: int | None, path: str = "train.scheduler") -> WarmupScheduler:
    """Build from config; ``milestones`` are epochs when ``iters_per_epoch`` is given, else iterations."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "multistep")
    if kind not in SCHEDULES:
        raise ConfigError(f"{path}.type: unknown schedule {kind!r}{closest(str(kind), SCHEDULES)}; "
                          f"choose one of {', '.join(SCHEDULES)}")
    allowed = {"multistep": ("milestones", "gamma"), "cosine": ("min_lr_ratio",),
               "poly": ("power", "min_lr_ratio")}[kind] + ("warmup_iters", "warmup_factor",
                                                            "weight_decay_end")
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: not an option of the {kind} schedule"
                              f"{closest(key, allowed)}; valid: {', '.join(allowed)}")
    if "milestones" in cfg:
        scale = iters_per_epoch or 1
        cfg["milestones"] = [int(m) * scale for m in cfg["milestones"]]
    cfg["warmup_iters"] = int(cfg.get("warmup_iters", 0))
    wd_end = cfg.get("weight_decay_end")
    if wd_end is not None:
        if isinstance(wd_end, bool) or not isinstance(wd_end, (int, float)) or wd_end < 0:
            raise ConfigError(f"{path}.weight_decay_end: expected a number >= 0, got {wd_end!r}")
        if not any(float(g.get("weight_decay", 0.0)) > 0 for g in optimizer.param_groups):
            raise ConfigError(f"{path}.weight_decay_end: needs train.optimizer.weight_decay > 0 "
                              f"(the schedule's start)")
    return WarmupScheduler(optimizer, kind=kind, max_iters=max_iters, **cfg)
