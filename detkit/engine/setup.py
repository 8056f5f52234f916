"""Trainer settings (``train`` and ``dist`` config sections), seeding, epoch-wise data iteration."""

from __future__ import annotations

import copy
import inspect
import os
import random
import re
from typing import Iterator

import numpy as np
import torch

from ..config import check_keys, merge
from ..registry import ConfigError

__all__ = ["TRAIN_DEFAULTS", "DIST_DEFAULTS", "train_settings", "dist_settings", "seed_everything",
           "set_loader_epoch", "epoch_batches", "split_config", "parse_duration"]

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
    # fp16_inference: best.pth / final.pth hold float16 weights (half the size; last.pth and
    # iter_N.pth, which resume reads, stay exact)
    "checkpoint": {"interval": 1, "keep": 1, "best_metric": "bbox/AP", "fp16_inference": True},
    "load_from": None,
    "early_stop": None,
    "max_time": None,
}
EARLY_STOP_KEYS = {"metric": None, "patience": 10}
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
    if int(s["checkpoint"]["keep"]) < 0:
        raise ConfigError(f"train.checkpoint.keep: must be >= 0, got {s['checkpoint']['keep']}")
    s["early_stop"] = _early_stop(s["early_stop"], s["checkpoint"]["best_metric"])
    s["max_time"] = parse_duration(s["max_time"], "train.max_time")
    return copy.deepcopy(s)


def _early_stop(value, best_metric) -> dict | None:
    """``{metric, patience}`` with the metric defaulting to ``checkpoint.best_metric``; or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"train.early_stop: expected {{metric: bbox/AP, patience: 10}} or null, "
                          f"got {value!r}")
    check_keys(value, EARLY_STOP_KEYS, "train.early_stop")
    out = {**EARLY_STOP_KEYS, **value}
    out["metric"] = out["metric"] or best_metric
    if not out["metric"]:
        raise ConfigError("train.early_stop.metric: not set and train.checkpoint.best_metric is "
                          "null; name the evaluation key to watch (e.g. bbox/AP)")
    patience = out["patience"]
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ConfigError(f"train.early_stop.patience: expected a whole number of evaluations "
                          f">= 1, got {patience!r}")
    return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}


def parse_duration(value, path: str) -> float | None:
    """``train.max_time`` in seconds: a number of hours (as Ultralytics' ``time``) or a string
    with a unit, ``45s`` / ``90m`` / ``2h`` / ``1d``; None stays None (no limit)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) * 3600
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(f"{path}: {value!r} is not a duration; use hours (1.5) or a number "
                              f"with a unit: 45s, 90m, 2h, 1d")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not seconds > 0:
        raise ConfigError(f"{path}: must be > 0, got {value!r}")
    return seconds


def split_config(data: dict, name: str) -> dict:
    """``data[name]`` with ``skip_bad_images`` defaulting to ``data.skip_bad_images`` (one switch for
    every split; a split's own key wins)."""
    split = data[name]
    every = data.get("skip_bad_images", False)
    if not isinstance(every, bool):
        raise ConfigError(f"data.skip_bad_images: expected true or false, got {every!r}")
    if not isinstance(split, dict) or "skip_bad_images" in split or not every:
        return split
    return {**split, "skip_bad_images": True}


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
