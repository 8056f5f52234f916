#!/usr/bin/env python
"""Draw the pictures of a training run into its work dir (finished or still running).

    python tools/plot.py WORK_DIR [--checkpoint CKPT] [--device cpu|cuda] [--max-images N]
        [--score-thr 0.25] [--iou-thr 0.5] [--no-tensorboard]

Writes ``results.png`` (loss and metric curves of ``metrics.jsonl``), ``labels.png`` (label
distribution of ``data.train``), ``confusion_matrix.png`` (rows ground truth, columns
prediction, a background row for false positives and a background column for missed boxes;
a detection counts at IoU >= --iou-thr with score >= --score-thr) and ``val_predictions.jpg``
(val images, ground truth beside predictions), using ``WORK_DIR/config.yaml`` and the newest of
``last.pth`` / ``final.pth`` / ``best.pth``. Training writes the same files when it ends. When
the work dir has TensorBoard events the pictures are added there as images. Exit code 2 when
WORK_DIR has no config.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import add_debug_flag, run_cli  # noqa: E402
from detkit.errors import DetkitError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", metavar="WORK_DIR")
    parser.add_argument("--checkpoint", help="weights for the val pictures (default: newest in WORK_DIR)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--max-images", type=int, help="val images for the confusion matrix (default all)")
    parser.add_argument("--score-thr", type=float, default=0.25)
    parser.add_argument("--iou-thr", type=float, default=0.5)
    parser.add_argument("--no-tensorboard", action="store_true",
                        help="do not add the pictures to TensorBoard")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def plot_main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    if not (work_dir / "config.yaml").is_file():
        raise DetkitError(f"{work_dir} is not a training work dir (no config.yaml)")
    from detkit.engine.plots import write_plots

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    written = write_plots(work_dir, checkpoint=args.checkpoint, device=args.device,
                          max_images=args.max_images, score_thr=args.score_thr, iou_thr=args.iou_thr,
                          tensorboard=False if args.no_tensorboard else None, log=log)
    for path in written.values():
        print(path)
    return 0 if written else 1


def main(argv=None) -> int:
    return run_cli(plot_main, argv)


if __name__ == "__main__":
    sys.exit(main())
