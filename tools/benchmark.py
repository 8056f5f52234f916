"""Benchmarks: ``python tools/benchmark.py [SECTION ...] [--threads N] [--repeats R]``.

Protocol (for adding a section): each module ``tools/benchmarks/<section>.py`` defines

    def run(args: argparse.Namespace) -> None

which prints one markdown table (plus a short note of the setting) to stdout. ``args`` carries
``threads``, ``repeats``, ``warmup``, ``size`` and ``device`` (all sections share these options).
Helpers for timing (median of repeats after warm-up), parameter and FLOP counting
(``torch.utils.flop_counter.FlopCounterMode``) and table printing live in
``tools/benchmarks/common.py``. Without SECTION arguments every section runs in name order.

Example: ``python tools/benchmark.py backbones --threads 2 --repeats 5``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))  # makes ``benchmarks`` importable
sys.path.insert(0, str(TOOLS.parent))  # detkit from the source tree without installing


def available_sections() -> list[str]:
    import benchmarks

    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                  if not m.name.startswith("_") and m.name != "common")


def main(argv: list[str] | None = None) -> None:
    sections = available_sections()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"sections to run (default: all of {', '.join(sections)})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--size", type=int, default=640, help="square input size in pixels")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in sections]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; available: {', '.join(sections)}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (median), warm-up {args.warmup}\n")
    for name in args.sections or sections:
        print(f"## {name}\n")
        importlib.import_module(f"benchmarks.{name}").run(args)
        print()


if __name__ == "__main__":
    main()
