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
import traceback
from typing import Callable, Sequence

from .errors import DetkitError

__all__ = ["run_cli", "add_debug_flag", "user_message", "USER_ERRORS"]

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
