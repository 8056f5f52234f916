"""Trainer behaviour on the shapes data: exact resume, accumulation, AMP, skipped steps, NaN stop."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.config import load_config
from detkit.engine import CheckpointError, Trainer, load_checkpoint, train
from detkit.engine.setup import TRAIN_DEFAULTS, train_settings
from detkit.registry import ConfigError

from engine_helpers import REPO, base_config, read_metrics


def test_runtime_yaml_documents_the_defaults():
    runtime = load_config(REPO / "configs/_base_/runtime.yaml")["train"]
    assert runtime == TRAIN_DEFAULTS


def test_train_section_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.acumulate.*did you mean 'accumulate'"):
        train_settings({"train": {"acumulate": 2}})
    with pytest.raises(ConfigError, match="train.amp.dtype.*float32"):
        train_settings({"train": {"amp": {"enabled": True, "dtype": "float32"}}})
    with pytest.raises(ConfigError, match="train.ema.decy"):
        train_settings({"train": {"ema": {"decy": 0.9}}})
    # a config's optimizer replaces the default one instead of merging keys into it
    s = train_settings({"train": {"optimizer": {"type": "AdamW", "lr": 1e-3}}})
    assert s["optimizer"] == {"type": "AdamW", "lr": 1e-3}


@pytest.mark.slow
def test_exact_resume_mid_epoch_with_augmentation_and_workers(shapes_root, tmp_path):
    """2N iterations straight == N, stop, --resume, N more: same losses, lrs and final weights.

    Batch 4 of 16 images: 4 iterations per epoch, so N=3 stops mid-epoch and the resumed half
    crosses an epoch boundary; HorizontalFlip (p=0.5) and 2 workers are on.
    """
    cfg = base_config(shapes_root, iters=6, batch=4, workers=2, ema={"enabled": True, "decay": 0.9,
                                                                       "tau": 0})
    assert cfg["data"]["train"]["pipeline"], "the shapes base config should augment"
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_after=3)
    assert load_checkpoint(tmp_path / "resumed" / "last.pth")["iter"] == 3
    train(cfg, tmp_path / "resumed", resume=True)

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["iter"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # no duplicate records
    keys = [k for k in straight[0] if k.startswith("loss")] + ["lr", "grad_norm"]
    assert len(keys) >= 4
    for a, b in zip(straight[3:], resumed[3:]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    a = load_checkpoint(tmp_path / "straight" / "last.pth")
    b = load_checkpoint(tmp_path / "resumed" / "last.pth")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_accumulate_two_equals_double_batch(shapes_root, tmp_path):
    """Batch B with accumulate 2 == batch 2B (toy model: no BatchNorm, loss averaged per image)."""
    common = dict(toy=True, iters=2, workers=0, scheduler={"type": "multistep", "milestones": []},
                  optimizer={"type": "SGD", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3})
    small = base_config(shapes_root, batch=2, accumulate=2, **common)
    large = base_config(shapes_root, batch=4, accumulate=1, **common)
    train(small, tmp_path / "small")
    train(large, tmp_path / "large")
    a = load_checkpoint(tmp_path / "small" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "large" / "last.pth")["model"]
    init = Trainer(large, tmp_path / "init").model.state_dict()
    assert any(not torch.allclose(init[k], b[k]) for k in b), "training did not move the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la, lb = read_metrics(tmp_path / "small"), read_metrics(tmp_path / "large")
    assert la[0]["loss"] == pytest.approx(lb[0]["loss"], rel=1e-5)


@pytest.mark.slow
def test_bf16_amp_on_cpu_lowers_the_loss(shapes_root, tmp_path):
    cfg = base_config(shapes_root, iters=24, batch=4, amp={"enabled": True, "dtype": "bfloat16"},
                      optimizer={"type": "AdamW", "lr": 5e-3, "weight_decay": 1e-4},
                      scheduler={"type": "cosine", "warmup_iters": 2})
    cfg["data"]["train"]["pipeline"] = []
    cfg["evaluation"] = None  # training only
    trainer = Trainer(cfg, tmp_path)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    seen = []
    original = trainer.ddp_model.forward

    def spy(images, targets=None):
        out = original(images, targets)
        if trainer.ddp_model.training:
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return out

    trainer.ddp_model.forward = spy
    trainer.train()
    records = read_metrics(tmp_path)
    first = sum(r["loss"] for r in records[:4]) / 4
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < 0.85 * first, (first, last)  # measured: about 0.74
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["skipped_steps"] == 0 and seen == [torch.bfloat16] * 24


def _inject_inf_on_second_step(trainer):
    weight = trainer.model.box.weight

    def hook(grad):
        return grad * math.inf if trainer.iter == 1 else grad

    weight.register_hook(hook)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_inf_gradient_step_is_skipped_and_counted(shapes_root, tmp_path, dtype):
    """bfloat16: no scaler, the trainer skips on a non-finite grad norm; float16: GradScaler on CPU."""
    cfg = base_config(shapes_root, toy=True, iters=4, amp={"enabled": True, "dtype": dtype},
                      clip_grad={"max_norm": 10.0})
    trainer = Trainer(cfg, tmp_path)
    assert trainer.scaler.is_enabled() == (dtype == "float16")
    _inject_inf_on_second_step(trainer)
    batches = iter(trainer.train_loader)
    trainer.run_step([next(batches)])
    trainer.iter = 1
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None
    out = trainer.run_step([next(batches)])
    assert not math.isfinite(out["grad_norm"]) and trainer.skipped_steps == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    if scale is not None:
        assert trainer.scaler.get_scale() == scale * 0.5
    trainer.iter = 2
    trainer.run_step([next(batches)])
    assert trainer.skipped_steps == 1
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_skipped_steps_logged(shapes_root, tmp_path):
    cfg = base_config(shapes_root, toy=True, iters=4, amp={"enabled": True, "dtype": "bfloat16"})
    trainer = Trainer(cfg, tmp_path)
    _inject_inf_on_second_step(trainer)
    trainer.train()
    assert [r["skipped_steps"] for r in read_metrics(tmp_path)] == [0, 1, 1, 1]


def test_nan_loss_stops_naming_term_and_iteration(shapes_root, tmp_path):
    cfg = base_config(shapes_root, toy=True, iters=6, checkpoint={"interval": 2, "keep": 0,
                                                                  "best_metric": None})
    trainer = Trainer(cfg, tmp_path)
    forward_train = trainer.model.forward_train

    def poisoned(batch, targets):
        losses = forward_train(batch, targets)
        if trainer.iter == 2:  # the third iteration
            losses["loss_box"] = losses["loss_box"] * math.nan
        return losses

    trainer.model.forward_train = poisoned
    with pytest.raises(FloatingPointError, match=r"iteration 3 .*loss_box=nan"):
        trainer.train()
    ckpt = load_checkpoint(tmp_path / "last.pth")
    assert ckpt["iter"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2]


def test_load_from_finetunes_other_class_count(shapes_root, tmp_path, capsys):
    src = base_config(shapes_root, toy=True, iters=1)
    src["model"]["num_classes"] = 7
    train(src, tmp_path / "src")
    dst = base_config(shapes_root, toy=True, iters=1, load_from=str(tmp_path / "src" / "last.pth"))
    trainer = Trainer(dst, tmp_path / "dst")
    out = capsys.readouterr().out
    assert "re-initialised" in out and "cls" in out and "[7, 8] vs model [4, 8]" in out
    source = load_checkpoint(tmp_path / "src" / "last.pth")["model"]
    assert torch.equal(trainer.model.box.weight, source["box.weight"])
    # a plain resume with the wrong class count is refused with the keys and shapes
    with pytest.raises(CheckpointError, match=r"cls.weight: .*\[7, 8\] vs model \[4, 8\]"):
        Trainer(base_config(shapes_root, toy=True, iters=1), tmp_path / "x",
                resume=str(tmp_path / "src" / "last.pth"))


def test_epoch_schedule_periodic_eval_and_best_checkpoint(shapes_root, tmp_path):
    """16 images, batch 4: 4 iterations/epoch; epochs convert milestones/intervals to iterations."""
    cfg = base_config(shapes_root, toy=True, batch=4, max_iters=None, max_epochs=3, eval_interval=1,
                      scheduler={"type": "multistep", "milestones": [2], "gamma": 0.1},
                      optimizer={"type": "SGD", "lr": 0.2, "momentum": 0.0},
                      checkpoint={"interval": 1, "keep": 2, "best_metric": "bbox/AP"})
    cfg["model"]["oracle"] = True
    train(cfg, tmp_path)
    records = read_metrics(tmp_path)
    assert [r["iter"] for r in records] == list(range(1, 13))
    assert [r["epoch"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["lr"] for r in records] == pytest.approx([0.2] * 8 + [0.02] * 4)
    evals = read_metrics(tmp_path, "val")
    assert [r["iter"] for r in evals] == [4, 8, 12]
    best = max(evals, key=lambda r: r["bbox/AP"])
    ckpt = load_checkpoint(tmp_path / "best.pth")
    assert ckpt["iter"] == best["iter"] and ckpt["best"]["value"] == best["bbox/AP"]
    # keep: 2 earlier last.pth files (saved at epochs 1, 2), none a copy of last.pth (epoch 3)
    assert sorted(p.name for p in tmp_path.glob("iter_*.pth")) == ["iter_4.pth", "iter_8.pth"]
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 3


def test_deterministic_flag(shapes_root, tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(base_config(shapes_root, toy=True, iters=1), tmp_path, deterministic=True)
        assert trainer.settings["deterministic"] and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
