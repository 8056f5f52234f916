#!/usr/bin/env python
"""Train a detkit model; the same command runs one process or many under torchrun.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--set key=value ...]
        [--deterministic]
    torchrun --nproc-per-node 8 tools/train.py CONFIG ...
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:PORT tools/train.py CONFIG ...
    torchrun --standalone --nproc-per-node 8 --max-restarts 3 tools/train.py CONFIG --resume
        (restarted workers continue from the newest checkpoint; fresh start when there is none)

The work dir (default ``work_dirs/<config name>``) receives ``config.yaml`` (the resolved
config), ``metrics.jsonl``, ``tensorboard/`` events, ``last.pth``, ``best.pth`` and
``iter_N.pth``. ``--resume`` alone continues from the newest readable checkpoint of the work
dir (falling back to an older one when the newest is corrupt); ``--resume CKPT`` from that
file. Exit code 2 for a bad config, checkpoint, argument or data (a missing folder or file, an
unreadable image, a bad label file; also when a DataLoader worker hits it), printed as one
``error: ...`` line; ``--debug`` (or ``DETKIT_DEBUG=1``) adds the traceback. Exit code 1 for a
training failure (e.g. a non-finite loss). Exit code 143 after a SIGTERM: ``last.pth`` was saved
at the next iteration boundary; under ``torchrun --max-restarts N ... --resume`` the workers are
restarted and continue from it (README "Preemption and restarts").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import run_cli, run_training, training_parser  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    return training_parser(__doc__, config_help="YAML config file",
                           set_example="train.max_iters=1000 data.train.batch_size=8").parse_args(argv)


def train_main(argv=None) -> int:
    """Train; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    from detkit.engine import train

    return run_training(train, args)


def main(argv=None) -> int:
    """The exit code: 0 done, 2 bad input (one ``error:`` line), 1 training failure."""
    return run_cli(train_main, argv)


if __name__ == "__main__":
    sys.exit(main())
