"""How the command-line tools end: one ``error: ...`` line and exit code 2 for bad input.

Every tool ends with ``sys.exit(run_cli(main))``. ``run_cli`` calls ``main(argv)`` and turns

* a :class:`~detkit.errors.DetkitError` (``ConfigError``, ``DatasetError``, ``CheckpointError``)
  or a missing / unreadable file into ``error: <message>`` on stderr and exit code 2,
* a ``FloatingPointError`` (training diverged) into ``error: <message>`` and exit code 1,

without a traceback. An error raised inside a DataLoader worker process reaches the main process
re-raised by torch, with the worker's traceback pasted into its message; only the worker's own
message is printed. ``--debug`` on the command line or ``DETKIT_DEBUG=1`` in the environment
prints the full traceback as well. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .errors import DetkitError, plain_warnings

__all__ = ["run_cli", "add_debug_flag", "user_message", "USER_ERRORS", "training_parser", "run_training"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    DetkitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

# torch's ExceptionWrapper.reraise: "Caught <Type> in DataLoader worker process <n>.\n
# Original Traceback (most recent call last):\n ... <module.Type>: <message>\n"
_WORKER_HEADER = re.compile(r"Caught (\w+) in (?:DataLoader worker process \d+|pin memory thread[^\n]*)\.\n"
                            r"Original Traceback \(most recent call last\):\n")


def user_message(error: BaseException) -> str:
    """The message to show for ``error``: a DataLoader worker's own message without its traceback."""
    text = str(error)
    header = _WORKER_HEADER.match(text)
    if header is None:
        return text
    # The traceback's last entry is "<qualified type name>: <message>" (the message may span lines).
    matches = list(re.finditer(rf"^(?:[\w.]+\.)?{header.group(1)}: ", text, flags=re.MULTILINE))
    return text[matches[-1].end():].rstrip() if matches else text


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: read by :func:`run_cli`; added to a tool's parser so that ``--help`` lists it."""
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error (also: DETKIT_DEBUG=1)")


def _prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"error (rank {os.environ.get('RANK', '0')}): " if world > 1 else "error: "


def run_cli(main: Callable[[list[str] | None], int], argv: Sequence[str] | None = None, *,
            user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``main(argv)``'s exit code; bad input -> 2, a diverged run -> 1 (see the module doc).

    ``user_errors`` adds exception types that this tool reports as bad input (e.g. ``ValueError``
    for a tool whose only ValueErrors come from the files it reads).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DETKIT_DEBUG", "").lower() in ("1", "true", "yes")
    if not debug:
        plain_warnings()   # "warning: ..." lines, as the errors are "error: ..." lines
    try:
        return main(args)
    except (*USER_ERRORS, *user_errors) as e:
        code = 2
        error: BaseException = e
    except FloatingPointError as e:
        code, error = 1, e
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(_prefix() + user_message(error), file=sys.stderr, flush=True)
    return code


def training_parser(description: str | None, *, config_help: str,
                    set_example: str) -> argparse.ArgumentParser:
    """The options of every engine-driven tool (``tools/train.py``, ``tools/pretrain.py``)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=config_help)
    parser.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="continue from CKPT, or without a value from the newest readable "
                             "checkpoint in the work dir")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"config overrides, e.g. {set_example}")
    parser.add_argument("--deterministic", action="store_true",
                        help="seed everything and use deterministic algorithms (slower)")
    parser.add_argument("--data", metavar="PATH", help="your own data instead of the config's: a data.yaml "
                        "or a COCO / YOLO / VOC folder (format, splits and class count found from it)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--no-plots", action="store_true",
                        help="do not write results.png, confusion_matrix.png ... at the end")
    add_debug_flag(parser)
    return parser


def run_training(train: Callable[..., object], args: argparse.Namespace) -> int:
    """``train(cfg, work_dir, resume=, deterministic=)`` for the parsed ``training_parser`` options.

    When training ends, rank 0 writes the plots into the work dir and prints a summary
    (:func:`detkit.engine.logging.finish_training`). Returns 0, or the signal's exit code (143)
    after a SIGTERM that saved ``last.pth``: torchrun counts it as a failure and restarts the
    workers when it has restarts left. Other errors propagate to :func:`run_cli`. The process
    group is torn down in every case.
    """
    # imported here: the engine (torch, the models) is not needed to print --help or an error
    from .data.sources import load_training_config
    from .device import select_training_device
    from .engine.dist import cleanup_distributed
    from .engine.logging import finish_training
    from .engine.preemption import TrainingInterrupted

    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    started = time.perf_counter()
    try:
        select_training_device(args.device)
        cfg = load_training_config(args.config, args.overrides, data=args.data)
        train(cfg, work_dir, resume=args.resume, deterministic=args.deterministic)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        cleanup_distributed()
    finish_training(cfg, work_dir, wall_s=time.perf_counter() - started,  # plots + summary, rank 0
                    plots=not getattr(args, "no_plots", False), device=getattr(args, "device", None))
    return 0
