#!/usr/bin/env python
"""Shrink checkpoints to what inference needs: one set of weights, the config and class names.

    python tools/strip_checkpoint.py CKPT [CKPT ...] [--fp16] [--force]
    python tools/strip_checkpoint.py CKPT --out model.pth [--fp16]

Keeps the EMA weights when the checkpoint has them (what evaluation used), else the trained
ones; drops the optimizer, scheduler, AMP scaler, RNG and sampler state (as training writes
``best.pth`` and ``final.pth`` itself). ``--fp16`` stores the weights as float16 (half the size;
loading casts them back). Without ``--out`` each file is replaced atomically. ``last.pth`` and
``iter_N.pth`` are what ``--resume`` reads, so stripping them in place needs ``--force``.
The result works everywhere a checkpoint is read (Predictor, tools/infer.py, tools/eval.py,
``train.load_from``). Exit code 2 for an unreadable file or a bad argument.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import add_debug_flag, run_cli  # noqa: E402
from detkit.errors import DetkitError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT")
    parser.add_argument("--out", help="output file (one CKPT only); default: replace CKPT")
    parser.add_argument("--fp16", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--force", action="store_true",
                        help="also strip last.pth / iter_N.pth in place (they can no longer be resumed)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.out and len(args.checkpoints) != 1:
        parser.error("--out takes one CKPT")
    return args


def _is_resume_file(path: Path) -> bool:
    from detkit.engine.checkpoint import ITER_PATTERN

    return path.name == "last.pth" or ITER_PATTERN.match(path.name) is not None


def strip_main(argv=None) -> int:
    import torch

    from detkit.engine.checkpoint import atomic_write_bytes, inference_checkpoint, load_checkpoint

    args = parse_args(argv)
    for name in args.checkpoints:
        src = Path(name)
        dst = Path(args.out) if args.out else src
        if dst == src and _is_resume_file(src) and not args.force:
            raise DetkitError(f"{src} is a resume checkpoint: write the stripped copy elsewhere "
                              f"with --out, or pass --force to strip it in place")
        lean = inference_checkpoint(load_checkpoint(src), fp16=args.fp16)
        buffer = io.BytesIO()
        torch.save(lean, buffer)
        before = src.stat().st_size
        atomic_write_bytes(dst, buffer.getvalue())
        print(f"{src} ({before / 2**20:.1f} MiB) -> {dst} ({dst.stat().st_size / 2**20:.1f} MiB, "
              f"{lean['meta']['weights']} weights, {lean['meta']['dtype']})")
    return 0


def main(argv=None) -> int:
    return run_cli(strip_main, argv)


if __name__ == "__main__":
    sys.exit(main())
