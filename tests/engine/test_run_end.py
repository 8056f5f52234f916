"""How a run ends: checkpoints before evaluations, SIGTERM on an evaluation iteration, early stop,
a time budget, the model summary, one data.skip_bad_images for every split, lean work dirs."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

from detkit.engine import Trainer, load_checkpoint, train
from detkit.engine import trainer as trainer_module
from detkit.engine.checkpoint import save_last_checkpoint
from detkit.engine.evaluate import build_val
from detkit.engine.preemption import TrainingInterrupted
from detkit.engine.setup import parse_duration, split_config, train_settings
from detkit.engine.summary import count_flops, model_summary
from detkit.errors import DatasetError
from detkit.registry import ConfigError

from engine_helpers import base_config, read_metrics


def _config(root, **train_keys):
    cfg = base_config(root, toy=True, **train_keys)
    cfg["model"]["oracle"] = True   # an AP that depends on the weights
    return cfg


def test_the_checkpoint_is_written_before_an_evaluation_that_fails(shapes_root, tmp_path, monkeypatch):
    def corrupt_val_image(*args, **kwargs):
        raise DatasetError("cannot read image val/3.jpg; set data.val.skip_bad_images: true")

    monkeypatch.setattr(trainer_module, "inference_on_loader", corrupt_val_image)
    with pytest.raises(trainer_module.EvaluationError) as info:
        train(_config(shapes_root, iters=3), tmp_path)
    message = str(info.value)
    assert "cannot read image val/3.jpg" in message
    saved = f"{tmp_path / 'last.pth'} (iteration 3) and {tmp_path / 'final.pth'}"
    assert f"the training is saved in {saved}" in message
    assert load_checkpoint(tmp_path / "last.pth")["iter"] == 3
    assert load_checkpoint(tmp_path / "final.pth")["iter"] == 3
    assert not (tmp_path / "best.pth").exists()


def test_a_corrupt_val_image_costs_no_training_and_one_switch_skips_it(shapes_root, tmp_path):
    # issue 29's lost run: train images fine, one val image corrupt, skip_bad_images on train only
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    (root / "val" / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = _config(root, iters=2)
    cfg["data"]["train"]["skip_bad_images"] = True
    with pytest.raises(trainer_module.EvaluationError) as info:
        train(cfg, tmp_path / "run")
    assert "000003.png" in str(info.value) and "\n" not in str(info.value)
    assert load_checkpoint(tmp_path / "run" / "last.pth")["iter"] == 2
    assert load_checkpoint(tmp_path / "run" / "final.pth")["iter"] == 2

    del cfg["data"]["train"]["skip_bad_images"]
    cfg["data"]["skip_bad_images"] = True                   # one switch for every split
    train(cfg, tmp_path / "again")
    assert [r["iter"] for r in read_metrics(tmp_path / "again", "val")] == [2]


def _signal_during(trainer: Trainer, iteration: int) -> None:
    run_step = trainer.run_step

    def signalled(batches):
        if trainer.iter == iteration - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return run_step(batches)

    trainer.run_step = signalled


def test_a_stop_agreed_on_an_evaluation_iteration_saves_first_and_evaluates_on_resume(shapes_root,
                                                                                      tmp_path):
    cfg = _config(shapes_root, iters=4, eval_interval=2, deterministic=True,
                  checkpoint={"interval": 4, "keep": 0, "best_metric": "bbox/AP"})
    train(cfg, tmp_path / "reference")
    reference = read_metrics(tmp_path / "reference", "val")
    assert [r["iter"] for r in reference] == [2, 4]

    work = tmp_path / "work"
    trainer = Trainer(cfg, work)
    _signal_during(trainer, 2)
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        with pytest.raises(TrainingInterrupted):
            trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    # saved at iteration 2 without running its evaluation (minutes past a grace period)
    assert load_checkpoint(work / "last.pth")["iter"] == 2
    assert read_metrics(work, "val") == []

    train(cfg, work, resume=True)   # evaluates iteration 2 first, then trains on
    got = read_metrics(work, "val")
    assert [r["iter"] for r in got] == [2, 4]
    for a, b in zip(got, reference):
        assert a["bbox/AP"] == b["bbox/AP"]
    best = max(reference, key=lambda r: r["bbox/AP"])
    assert load_checkpoint(work / "best.pth")["best"]["iter"] == best["iter"]


def test_early_stop_after_patience_evaluations_without_improvement(shapes_root, tmp_path):
    # lr 0: the weights never change, so the AP of iteration 1 is never beaten
    cfg = _config(shapes_root, iters=10, eval_interval=1,
                  optimizer={"type": "SGD", "lr": 0.0, "momentum": 0.0},
                  checkpoint={"interval": 10, "keep": 0, "best_metric": "bbox/AP"},
                  early_stop={"patience": 2})
    train(cfg, tmp_path)
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["iter"] for r in read_metrics(tmp_path, "val")] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "last.pth")["iter"] == 3
    assert load_checkpoint(tmp_path / "final.pth")["iter"] == 3
    assert load_checkpoint(tmp_path / "best.pth")["iter"] == 1
    assert not (tmp_path / "final.pth").samefile(tmp_path / "best.pth")


def test_a_time_budget_ends_with_a_normal_save_and_evaluation(shapes_root, tmp_path, capsys):
    cfg = _config(shapes_root, iters=6, eval_interval=0, max_time="0.001s",
                  checkpoint={"interval": 6, "keep": 0, "best_metric": "bbox/AP"})
    train(cfg, tmp_path)
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1]
    assert [r["iter"] for r in read_metrics(tmp_path, "val")] == [1]
    assert load_checkpoint(tmp_path / "last.pth")["iter"] == 1
    assert (tmp_path / "final.pth").samefile(tmp_path / "best.pth")  # one file for both
    assert "train.max_time (0 s) reached at iteration 1 of 6" in capsys.readouterr().err


def test_train_settings_check_early_stop_and_max_time():
    s = train_settings({"train": {"early_stop": {"patience": 3}, "max_time": "90m"}})
    assert s["early_stop"] == {"metric": "bbox/AP", "patience": 3} and s["max_time"] == 5400
    assert parse_duration(1.5, "x") == 5400 and parse_duration("2h", "x") == 7200
    with pytest.raises(ConfigError, match="train.max_time: 'soon' is not a duration"):
        train_settings({"train": {"max_time": "soon"}})
    with pytest.raises(ConfigError, match="train.early_stop.patience"):
        train_settings({"train": {"early_stop": {"patience": 0}}})
    with pytest.raises(ConfigError, match="train.early_stop.patiense.*did you mean 'patience'"):
        train_settings({"train": {"early_stop": {"patiense": 3}}})
    with pytest.raises(ConfigError, match="train.early_stop.metric: not set"):
        train_settings({"train": {"early_stop": {}, "checkpoint": {"best_metric": None}}})


def test_model_summary_counts_parameters_and_flops_by_hand(shapes_root, tmp_path):
    trainer = Trainer(_config(shapes_root, iters=1), tmp_path)
    model = trainer.model
    h, w = trainer.train_set[0][0].shape[1:]
    # toy body: conv 3->8 (3x3, stride 4, pad 1), conv 8->8 (stride 2), two Linear 8->4
    h1, w1 = (h - 1) // 4 + 1, (w - 1) // 4 + 1
    h2, w2 = (h1 - 1) // 2 + 1, (w1 - 1) // 2 + 1
    by_hand = 2 * (3 * 9 * 8 * h1 * w1 + 8 * 9 * 8 * h2 * w2 + 2 * 8 * 4)
    image = trainer.train_set[0][0]
    assert count_flops(model, lambda: model([image])) == by_hand
    params = sum(p.numel() for p in model.parameters())
    assert trainer.summary() == (f"model: EngineToyDetector {params:,} parameters ({params:,} "
                                 f"trainable), {by_hand / 1e9:.3g} GFLOPs at 3x{h}x{w}")
    assert model.training   # the summary's eval pass leaves the mode as it was
    broken = model_summary("X", torch.nn.Linear(2, 2), lambda: 1 / 0, None)
    assert broken == "model: X 6 parameters (6 trainable), GFLOPs n/a"
    trainer.logger.close()


def test_one_skip_bad_images_for_every_split(shapes_root):
    cfg = _config(shapes_root, iters=1)
    cfg["data"]["skip_bad_images"] = True
    assert split_config(cfg["data"], "train")["skip_bad_images"] is True
    assert build_val(cfg)[0].skip_bad_images is True
    cfg["data"]["val"]["skip_bad_images"] = False          # a split's own key wins
    assert build_val(cfg)[0].skip_bad_images is False
    cfg["data"]["skip_bad_images"] = "yes"
    with pytest.raises(ConfigError, match="data.skip_bad_images: expected true or false"):
        split_config(cfg["data"], "train")


def test_iter_files_are_earlier_last_files_never_copies(tmp_path):
    for it in range(1, 5):
        save_last_checkpoint({"iter": it, "model": {"w": torch.full((2,), float(it))}}, tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["iter_2.pth", "iter_3.pth", "last.pth"]
    for name, it in (("iter_2.pth", 2), ("iter_3.pth", 3), ("last.pth", 4)):
        assert load_checkpoint(tmp_path / name)["model"]["w"][0] == it
    save_last_checkpoint({"iter": 4, "model": {}}, tmp_path, keep=2)    # the same iteration again
    assert not (tmp_path / "iter_4.pth").exists()
