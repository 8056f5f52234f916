#!/usr/bin/env python
"""Check a config's data before training: read every image and annotation, report all problems.

    python tools/check_data.py CONFIG [--data PATH] [--set key=value ...] [--workers 4]

Builds ``data.train``, ``data.val`` (and ``data.test``) as training would, which parses and checks
every annotation file, then reads every image (and mask) of them; prints one summary line per
split and every problem found, each naming its file. ``--data`` and ``--set`` act as in
``tools/train.py``, and so does the class count (``model.num_classes`` against the data).
Exit code 0: no problems; 1: problems listed; 2: a bad config or argument (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import add_debug_flag, run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (the one you will train)")
    p.add_argument("--data", metavar="PATH", help="your own data, as tools/train.py --data")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides, e.g. data.root=/data/coco")
    p.add_argument("--workers", type=int, default=4, help="threads reading images (default 4)")
    add_debug_flag(p)
    return p.parse_args(argv)


def check_main(argv=None) -> int:
    args = parse_args(argv)
    from detkit.data.check import check_data, format_report
    from detkit.data.sources import load_training_config

    cfg = load_training_config(args.config, args.overrides, data=args.data)
    reports = check_data(cfg, workers=args.workers)
    print(format_report(reports))
    return 1 if any(r.problems for r in reports) else 0


def main(argv=None) -> int:
    return run_cli(check_main, argv)


if __name__ == "__main__":
    sys.exit(main())
