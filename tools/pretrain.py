#!/usr/bin/env python
"""Self-supervised pre-training of a detkit backbone on unlabeled images (detkit/ssl).

    python tools/pretrain.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--set key=value ...]
        [--deterministic]
    torchrun --nproc-per-node 8 tools/pretrain.py CONFIG ...

Same engine, options and outputs as ``tools/train.py`` (``config.yaml``, ``metrics.jsonl`` with
the loss and ``feature_std``, ``tensorboard/``, ``last.pth``, ``iter_N.pth``). Fine-tune a
detector from the result with ``--set model.backbone.weights=WORK_DIR/last.pth``. Exit code 2
for a bad config, checkpoint or argument, 1 for a training failure (e.g. a non-finite loss),
143 after a SIGTERM that saved ``last.pth`` (as ``tools/train.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import run_cli, run_training, training_parser  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    return training_parser(__doc__, config_help="YAML pre-training config (configs/pretrain/)",
                           set_example="train.max_iters=200 data.train.batch_size=32").parse_args(argv)


def pretrain_main(argv=None) -> int:
    """Pre-train; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    from detkit.ssl import pretrain

    return run_training(pretrain, args)


def main(argv=None) -> int:
    """The exit code: 0 done, 2 bad input (one ``error:`` line), 1 training failure."""
    return run_cli(pretrain_main, argv)


if __name__ == "__main__":
    sys.exit(main())
