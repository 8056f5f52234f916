"""Trainer settings (``train`` and ``dist`` config sections), seeding, epoch-wise data iteration."""

from __future__ import annotations

import copy
import inspect
import os
import random
from typing import Iterator

import numpy as np
import torch

from ..config import check_keys, merge
from ..registry import ConfigError

__all__ = ["TRAIN_DEFAULTS", "DIST_DEFAULTS", "train_settings", "dist_settings", "seed_everything",
           "set_loader_epoch", "epoch_batches"]

# Mirrors configs/_base_/runtime.yaml (a test keeps them equal) so that a config without that
# base still trains with documented values.
TRAIN_DEFAULTS: dict = {
    "seed": 0,
    "deterministic": False,
    "max_epochs": 12,
    "max_iters": None,
    "optimizer": {"type": "SGD", "lr": 0.02, "momentum": 0.9, "nesterov": False, "weight_decay": 1.0e-4,
                  "weight_decay_norm": 0.0, "weight_decay_bias": 0.0},
    "scheduler": {"type": "multistep", "milestones": [8, 11], "gamma": 0.1, "warmup_iters": 500,
                  "warmup_factor": 0.001},
    "accumulate": 1,
    "clip_grad": None,
    "amp": {"enabled": False, "dtype": "float16"},
    "ema": {"enabled": False, "decay": 0.9998, "tau": 2000},
    "sync_bn": False,
    "find_unused_parameters": False,
    "log_interval": 20,
    "eval_interval": 1,
    "checkpoint": {"interval": 1, "keep": 3, "best_metric": "bbox/AP"},
    "load_from": None,
}
_REPLACED = ("optimizer", "scheduler")  # a config's optimizer/scheduler replaces, never merges

# The ``dist`` section, mirrored by configs/_base_/runtime.yaml like TRAIN_DEFAULTS: the keyword
# arguments of detkit.engine.dist.init_distributed.
DIST_DEFAULTS: dict = {
    "timeout_minutes": 30.0,
    "init_timeout_minutes": 5.0,
}


def train_settings(cfg: dict) -> dict:
    """``cfg['train']`` over :data:`TRAIN_DEFAULTS`, checked: unknown keys and bad values raise."""
    user = cfg.get("train") or {}
    if not isinstance(user, dict):
        raise ConfigError("train: expected a mapping")
    check_keys(user, TRAIN_DEFAULTS, "train")
    base = {k: v for k, v in TRAIN_DEFAULTS.items() if not (k in _REPLACED and k in user)}
    s = merge(base, user)
    for key in ("amp", "ema", "checkpoint"):
        check_keys(s[key], TRAIN_DEFAULTS[key], f"train.{key}")
    if s["amp"]["dtype"] not in ("float16", "bfloat16"):
        raise ConfigError(f"train.amp.dtype: {s['amp']['dtype']!r} is not float16 or bfloat16")
    if int(s["accumulate"]) < 1:
        raise ConfigError(f"train.accumulate: must be >= 1, got {s['accumulate']}")
    if s["max_iters"] is None and int(s["max_epochs"]) < 1:
        raise ConfigError("train: set max_epochs >= 1 or max_iters")
    if s["max_iters"] is not None and int(s["max_iters"]) < 1:
        raise ConfigError(f"train.max_iters: must be >= 1, got {s['max_iters']}")
    clip = s["clip_grad"]
    if clip is not None and (not isinstance(clip, dict) or "max_norm" not in clip):
        raise ConfigError(f"train.clip_grad: expected {{max_norm: float}} or null, got {clip!r}")
    for key in ("log_interval",):
        if int(s[key]) < 1:
            raise ConfigError(f"train.{key}: must be >= 1")
    if int(s["checkpoint"]["interval"]) < 1:
        raise ConfigError("train.checkpoint.interval: must be >= 1")
    return copy.deepcopy(s)


def dist_settings(cfg: dict) -> dict:
    """``cfg['dist']`` over :data:`DIST_DEFAULTS`, checked: unknown keys and non-positive values raise."""
    user = cfg.get("dist") or {}
    if not isinstance(user, dict):
        raise ConfigError("dist: expected a mapping")
    check_keys(user, DIST_DEFAULTS, "dist")
    s = {**DIST_DEFAULTS, **user}
    for key, value in s.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"dist.{key}: expected a number of minutes > 0, got {value!r}")
    return {k: float(v) for k, v in s.items()}


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    """Seed python/numpy/torch with ``seed + rank``; optionally force deterministic kernels.

    Ranks get different seeds so that random choices inside the model (e.g. RoI sampling) do
    not repeat identically on every GPU; data order is seeded separately by the sampler.
    """
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        # cuBLAS needs this before its first call to be reproducible.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # warn_only: some detection ops (e.g. RoIAlign backward) have no deterministic CUDA kernel;
        # a warning names them instead of stopping training.
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_loader_epoch(loader, epoch: int) -> None:
    """Call ``set_epoch`` on whichever of loader / batch sampler / sampler has it."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, batch_sampler, getattr(batch_sampler, "sampler", None),
                getattr(loader, "sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)


def epoch_batches(loader, epoch: int, skip: int) -> Iterator:
    """Batches of ``epoch`` from batch index ``skip`` on (resume in the middle of an epoch).

    detkit loaders (``DetkitLoader.set_epoch(epoch, skip_batches)``) derive the order and every
    sample's augmentation seed from (seed, epoch, index), so skipping indices reproduces what
    an uninterrupted run would have seen next.
    """
    if skip and _accepts_skip(loader):
        loader.set_epoch(epoch, skip_batches=skip)
        return iter(loader)
    set_loader_epoch(loader, epoch)
    it = iter(loader)
    # Any other loader: load and drop the consumed batches. Slower, but exact as long as the
    # loader itself is reproducible per epoch.
    for _ in range(skip):
        next(it)
    return it


def _accepts_skip(loader) -> bool:
    fn = getattr(loader, "set_epoch", None)
    return callable(fn) and "skip_batches" in inspect.signature(fn).parameters
