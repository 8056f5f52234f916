"""Errors caused by the user's input, and warnings attributed to the user's code.

``DetkitError`` marks an error whose message is the whole story (it names the file, key or value
and what to do): the command-line tools print it as one ``error: ...`` line and exit with code 2
(:mod:`detkit.cli`). ``ConfigError`` (registry), ``CheckpointError`` (engine) and
``DatasetError`` derive from it. Every subclass takes a single message argument, so it pickles
and torch can re-raise it in the main process when a DataLoader worker raised it.

:func:`warn_once` emits a warning once per process for each message (a dataset built twice, for
training and for class names, warns once; under torchrun only rank 0 warns, since every rank
builds the same datasets) and attributes it to the first caller outside detkit (the user's script
or ``tools/train.py``), not to the registry line that constructed the dataset.
:func:`note_once` prints a one-line summary that is not a problem (e.g. a count of background
images) to stderr, once per process and on rank 0 only.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from types import FrameType

__all__ = ["DetkitError", "DatasetError", "warn_once", "note_once", "user_stacklevel", "plain_warnings"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Frames that are not the user's: detkit itself, and the DataLoader and multiprocessing machinery
# between a dataset and the code that iterates it (a forked worker's stack continues into the
# parent's frames, so a worker's warning also lands on the line that started the loop).
_NOT_USER_DIRS = (_PACKAGE_DIR, os.path.dirname(multiprocessing.__file__) + os.sep)
_DATALOADER_PART = os.sep + os.path.join("torch", "utils", "data") + os.sep   # without importing torch
_WARNED: set[str] = set()


class DetkitError(Exception):
    """An error in the user's input (config, data, checkpoint, arguments), explained by its message."""


class DatasetError(DetkitError, ValueError):
    """A problem of the user's data: a missing folder or file, an unreadable image, a bad label file."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that points at
    the first frame outside detkit (and outside the DataLoader / multiprocessing machinery)."""
    frame: FrameType | None = sys._getframe(1)   # the function that will call warnings.warn: level 1
    level = 1
    while frame is not None and (frame.f_code.co_filename.startswith(_NOT_USER_DIRS)
                                 or _DATALOADER_PART in frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def warn_once(message: str, category: type[Warning] = UserWarning, *, all_ranks: bool = False) -> None:
    """``warnings.warn(message)`` unless this process already warned with the same text.

    ``all_ranks``: warn on every torchrun rank (for what one rank sees alone, such as an image
    of its shard), not only on rank 0.
    """
    if message in _WARNED or (not all_ranks and os.environ.get("RANK", "0") != "0"):
        return
    _WARNED.add(message)
    warnings.warn(message, category, stacklevel=user_stacklevel())


def note_once(message: str) -> None:
    """Print ``note: message`` to stderr once per process (rank 0 only under torchrun)."""
    if message in _WARNED or os.environ.get("RANK", "0") != "0":
        return
    _WARNED.add(message)
    print(f"note: {message}", file=sys.stderr, flush=True)


def _plain_format(message, category, filename, lineno, line=None) -> str:
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"warning{kind}: {message}\n"


def plain_warnings() -> None:
    """Show warnings as one ``warning: message`` line (a category other than UserWarning in
    brackets), without Python's ``file:line: UserWarning:`` prefix and the quoted source line:
    the command-line tools' format (``--debug`` keeps Python's)."""
    warnings.formatwarning = _plain_format
