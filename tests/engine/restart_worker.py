"""``tools/train.py`` under torchrun with one scripted fault per restart (test_restarts.py).

    DETKIT_TEST_FAULTS="R:I:KIND,R:I:KIND,..." torchrun --max-restarts N \\
        tests/engine/restart_worker.py CONFIG --work-dir DIR --resume

Entry k is the fault of restart k (``TORCHELASTIC_RESTART_COUNT``): rank R at iteration I does

* ``step``    SIGKILL itself right after iteration I (logged; a checkpoint due at I is written);
* ``forward`` SIGKILL itself before the forward pass of iteration I (the peers wait in DDP);
* ``save``    SIGKILL itself inside the save at iteration I, after writing half of the temporary
  file (rank 0 only: it is the one that writes);
* ``term``    send SIGTERM to its parent (torchrun) after iteration I, as a scheduler preempting
  the job would, and wait until the SIGTERM that torchrun forwards to the workers arrives.

Restarts past the list (and entries ``-``) run without a fault.
"""

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detkit.engine import checkpoint as ckpt_io  # noqa: E402
from detkit.engine.trainer import Trainer  # noqa: E402

import engine_helpers  # noqa: E402,F401  (registers the toy detector)
from engine_helpers import REPO  # noqa: E402


def _this_fault() -> tuple[int, str] | None:
    entries = [e for e in os.environ.get("DETKIT_TEST_FAULTS", "").split(",") if e]
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart >= len(entries) or entries[restart] == "-":
        return None
    rank, iteration, kind = entries[restart].split(":")
    return (int(iteration), kind) if int(rank) == int(os.environ.get("RANK", "0")) else None


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(iteration: int, kind: str) -> None:
    if kind == "forward":
        run_step = Trainer.run_step

        def run_step_then_die(self, batches):
            if self.iter + 1 == iteration:
                _die()
            return run_step(self, batches)

        Trainer.run_step = run_step_then_die
    elif kind in ("step", "term"):
        after_step = Trainer._after_step

        def after_step_then_fault(self, *args):
            after_step(self, *args)
            if self.iter != iteration:
                return
            if kind == "step":
                _die()
            os.kill(os.getppid(), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while self._stop_signal.requested is None and time.monotonic() < deadline:
                time.sleep(0.05)

        Trainer._after_step = after_step_then_fault
    elif kind == "save":
        save_checkpoint = ckpt_io.save_checkpoint

        def save_half_then_die(state, paths):
            if state["iter"] == iteration:
                first = Path(paths[0])
                tmp = first.with_name(f".{first.name}.tmp.{os.getpid()}")
                tmp.write_bytes(b"\0" * 4096)  # what a save cut short leaves behind
                _die()
            save_checkpoint(state, paths)

        ckpt_io.save_checkpoint = save_half_then_die
    else:
        raise ValueError(f"DETKIT_TEST_FAULTS: unknown fault {kind!r}")


fault = _this_fault()
if fault is not None:
    _install(*fault)
spec = importlib.util.spec_from_file_location("detkit_train_cli", REPO / "tools/train.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
sys.exit(cli.main(sys.argv[1:]))
