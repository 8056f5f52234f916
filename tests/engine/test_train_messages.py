"""What training tells the user: the NaN message names the checkpoint that exists (or that none
does), progress falls back to lines on a terminal that reports 0 columns, FrozenBN without
weights warns at build time."""

import sys
import warnings

import pytest
import torch

from detkit import errors
from detkit.engine import Trainer
from detkit.engine import logging as train_logging
from detkit.registry import BACKBONES

from engine_helpers import base_config


def test_nan_message_says_which_checkpoint_exists(shapes_root, tmp_path):
    trainer = Trainer(base_config(shapes_root, toy=True, iters=4), tmp_path)
    nan = {"loss_cls": torch.tensor(float("nan")), "loss_box": torch.tensor(1.0)}
    with pytest.raises(FloatingPointError, match="no checkpoint has been written yet .*iteration 4"):
        trainer._reduce_and_check(nan)
    trainer.iter = 3
    trainer.save()
    with pytest.raises(FloatingPointError) as info:
        trainer._reduce_and_check(nan)
    assert f"{tmp_path / 'last.pth'} (iteration 3) holds the last finite weights" in str(info.value)
    trainer.logger.close()


@pytest.mark.parametrize("columns, bar", [(0, False), (120, True)])
def test_progress_lines_when_the_terminal_reports_no_width(tmp_path, monkeypatch, capsys, columns, bar):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)   # a terminal, which reports `columns`
    monkeypatch.setattr(train_logging, "_terminal_columns", lambda: columns)
    logger = train_logging.TrainLogger(tmp_path, enabled=True, max_iters=10, start_iter=0,
                                       tensorboard=False)
    assert (logger._bar is not None) == bar
    logger.log_train(1, 0, {"loss": 0.5, "lr": 0.01})
    logger.close()
    lines = capsys.readouterr().err
    assert ("iter 1 epoch 0  loss: 0.5" in lines) == (not bar)


def test_frozen_bn_without_weights_warns_at_build_time(monkeypatch):
    monkeypatch.setattr(errors, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BACKBONES.build({"type": "ResNet", "depth": 18, "norm": "FrozenBN", "weights": None})
        BACKBONES.build({"type": "ResNet", "depth": 18, "norm": "FrozenBN", "weights": None})
        BACKBONES.build({"type": "ResNet", "depth": 18, "norm": "BN", "weights": None})
    frozen = [w for w in caught if "FrozenBN" in str(w.message)]
    assert len(frozen) == 1 and "norm: BN" in str(frozen[0].message)
    assert frozen[0].filename == __file__          # the caller's line, not registry.py

    monkeypatch.setattr(errors, "_WARNED", set())
    monkeypatch.setenv("RANK", "1")                # torchrun: every rank builds the same model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BACKBONES.build({"type": "ResNet", "depth": 18, "norm": "FrozenBN", "weights": None})
        errors.warn_once("seen by this rank only", all_ranks=True)
    assert [str(w.message) for w in caught] == ["seen by this rank only"]
