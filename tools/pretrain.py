#!/usr/bin/env python
"""Self-supervised pre-training of a detkit backbone on unlabeled images (detkit/ssl).

    python tools/pretrain.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--set key=value ...]
        [--deterministic]
    torchrun --nproc-per-node 8 tools/pretrain.py CONFIG ...

Same engine, options and outputs as ``tools/train.py`` (``config.yaml``, ``metrics.jsonl`` with
the loss and ``feature_std``, ``tensorboard/``, ``last.pth``, ``iter_N.pth``). Fine-tune a
detector from the result with ``--set model.backbone.weights=WORK_DIR/last.pth``. Exit code 2
for a bad config, checkpoint or argument, 1 for a training failure (e.g. a non-finite loss).
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
    parser.add_argument("config", help="YAML pre-training config (configs/pretrain/)")
    parser.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="continue from CKPT, or without a value from the newest readable "
                             "checkpoint in the work dir")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides, e.g. train.max_iters=200 data.train.batch_size=32")
    parser.add_argument("--deterministic", action="store_true",
                        help="seed everything and use deterministic algorithms (slower)")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def pretrain_main(argv=None) -> int:
    """Pre-train; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    from detkit.engine.dist import cleanup_distributed
    from detkit.ssl import pretrain

    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    try:
        cfg = load_config(args.config, args.overrides)
        pretrain(cfg, work_dir, resume=args.resume, deterministic=args.deterministic)
    finally:
        cleanup_distributed()
    return 0


def main(argv=None) -> int:
    """The exit code: 0 done, 2 bad input (one ``error:`` line), 1 training failure."""
    return run_cli(pretrain_main, argv)


if __name__ == "__main__":
    sys.exit(main())
