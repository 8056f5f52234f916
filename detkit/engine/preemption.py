"""SIGTERM during training: save ``last.pth`` at the next iteration boundary all ranks agree on, exit.

torchrun forwards a SIGTERM it receives to every worker's process group and kills whatever still
runs 30 s later; schedulers (Slurm, Kubernetes) do the same with their own grace period. While
:class:`StopSignal` is active a SIGTERM only raises a flag. The trainer folds the flag into the loss
all-reduce it does anyway, so every rank learns in the same iteration that some rank was signalled,
and all of them save together at the end of that iteration and raise :class:`TrainingInterrupted`.
A SIGTERM that arrives after an iteration's loss all-reduce (during backward or the optimizer
step) is therefore seen one iteration later: the stop comes at the end of the *next* iteration.
When that iteration is due an evaluation, the trainer saves and skips it (``--resume`` runs it).
Further SIGTERMs change nothing: under Slurm a worker gets one from the scheduler and one from
torchrun at about the same time, and it must still save.
"""

from __future__ import annotations

import os
import signal
import threading
from functools import partial
from types import FrameType
from typing import Any, Callable

__all__ = ["StopSignal", "TrainingInterrupted", "ignore_sigterm_in_workers"]


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``last.pth`` at iteration ``iteration``.

    ``exit_code`` is the shell's code for a death by that signal (143 for SIGTERM): torchrun counts
    it as a failure and restarts the workers when it has restarts left (they resume with
    ``--resume``); a scheduler sees a job that did not finish.
    """

    def __init__(self, iteration: int, signum: int = signal.SIGTERM):
        self.iteration, self.signum = iteration, signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: saved last.pth at iteration "
                         f"{iteration}; continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignal:
    """Context manager: while active, SIGTERM sets :attr:`requested` instead of ending the process.

    A no-op outside the main thread (Python delivers signals only there). DataLoader
    workers replace it with one that dies; see :func:`ignore_sigterm_in_workers`.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is all we can do.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def ignore_sigterm_in_workers(loader: Any) -> None:
    """Make ``loader``'s worker processes ignore a SIGTERM that does not come from the trainer.

    torchrun signals each worker's whole process group, DataLoader workers included, and torch's
    worker loop dies of a SIGTERM from anyone but its parent; the trainer would then fail with
    "DataLoader worker ... is killed by signal" instead of saving. With this, a worker ignores a
    SIGTERM from elsewhere and still ends like torch's own on one from the trainer (which sends it
    when the workers do not stop by themselves); torch's watchdog ends it when the trainer is gone.
    Needs ``signal.sigwaitinfo`` (Linux); elsewhere torch's behaviour is left as it is.
    """
    if getattr(loader, "num_workers", 0) > 0 and hasattr(signal, "sigwaitinfo"):
        loader.worker_init_fn = partial(_ignore_foreign_sigterm_then, loader.worker_init_fn)


def _ignore_foreign_sigterm_then(init: Callable[[int], None] | None, worker_id: int) -> None:
    # Runs after torch installed its handler. A blocked SIGTERM waits for the thread below, the one
    # place that learns who sent it (a handler does not).
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()
    if init is not None:
        init(worker_id)
