"""What a run learns from its evaluations: the best checkpoint metric and early-stop patience.

The trainer writes ``last.pth`` *before* an iteration's evaluation (an evaluation that fails or
is killed must not cost the training), so the checkpoint holds this state as it was before that
evaluation. After each evaluation rank 0 also writes it, with the iteration, to
``eval_state.json`` in the work dir (a few hundred bytes, atomically); a resume from a checkpoint
of that same iteration takes it from there, and one whose evaluation never finished (SIGTERM on
an evaluation iteration) runs that evaluation first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..registry import ConfigError
from .checkpoint import atomic_write_bytes

__all__ = ["EvalTracker", "EVAL_STATE_FILE"]

EVAL_STATE_FILE = "eval_state.json"


class EvalTracker:
    """``best`` {metric, value, iter} of ``best_metric`` (higher is better; None: no best.pth) and,
    with ``early_stop`` {metric, patience}, ``watch`` {metric, value, iter, evals_since}."""

    def __init__(self, *, best_metric: str | None, early_stop: dict | None):
        self.best_metric, self.early_stop = best_metric, early_stop
        self.best: dict | None = None
        self.watch: dict | None = None

    def update(self, it: int, results: dict, log: Callable[[str], None]) -> tuple[bool, str | None]:
        """Record the evaluation at iteration ``it``: (best metric improved, reason to stop or None)."""
        improved = False
        metric = self.best_metric
        if metric and metric not in results:
            log(f"WARNING: train.checkpoint.best_metric '{metric}' is not among the evaluation "
                f"results ({', '.join(results)}); no best.pth is written")
        elif metric:
            value = float(results[metric])
            if self.best is None or value > self.best["value"]:
                self.best = {"metric": metric, "value": value, "iter": it}
                improved = True
        return improved, self._patience(it, results)

    def _patience(self, it: int, results: dict) -> str | None:
        if self.early_stop is None:
            return None
        metric, patience = self.early_stop["metric"], int(self.early_stop["patience"])
        if metric not in results:
            raise ConfigError(f"train.early_stop.metric '{metric}' is not among the evaluation results "
                           f"({', '.join(results)})")
        value = float(results[metric])
        if self.watch is None or value > self.watch["value"]:
            self.watch = {"metric": metric, "value": value, "iter": it, "evals_since": 0}
            return None
        self.watch["evals_since"] += 1
        if self.watch["evals_since"] < patience:
            return None
        return (f"early stop: {metric} has not improved for {patience} evaluations (best "
                f"{self.watch['value']:.4f} at iteration {self.watch['iter']})")

    def state_dict(self) -> dict:
        return {"best": self.best, "watch": self.watch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.watch = state.get("best"), state.get("watch")

    def write(self, work_dir: str | Path, it: int) -> None:
        text = json.dumps({"iter": it, **self.state_dict()})
        atomic_write_bytes(Path(work_dir) / EVAL_STATE_FILE, text.encode())

    @staticmethod
    def read(work_dir: str | Path) -> dict | None:
        """The saved state ({iter, best, watch}), or None when absent or unreadable."""
        try:
            state = json.loads((Path(work_dir) / EVAL_STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("iter"), int) else None
