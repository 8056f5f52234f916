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

from detkit.cli import add_debug_flag, run_cli  # noqa: E402
from detkit.config import load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="continue from CKPT, or without a value from the newest readable "
                             "checkpoint in the work dir")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides, e.g. train.max_iters=1000 data.train.batch_size=8")
    parser.add_argument("--deterministic", action="store_true",
                        help="seed everything and use deterministic algorithms (slower)")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def train_main(argv=None) -> int:
    """Train; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    from detkit.engine import train
    from detkit.engine.dist import cleanup_distributed
    from detkit.engine.preemption import TrainingInterrupted

    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, work_dir, resume=args.resume, deterministic=args.deterministic)
    except TrainingInterrupted as e:  # SIGTERM: last.pth saved; 143 tells torchrun it did not finish
        print(e, file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        cleanup_distributed()
    return 0


def main(argv=None) -> int:
    """The exit code: 0 done, 2 bad input (one ``error:`` line), 1 training failure."""
    return run_cli(train_main, argv)


if __name__ == "__main__":
    sys.exit(main())
