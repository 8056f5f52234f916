"""Training output on rank 0: ``metrics.jsonl``, TensorBoard events and a tqdm progress bar.

``metrics.jsonl`` holds one JSON object per line: ``{"mode": "train", "iter": i, "epoch": e,
"lr": ..., "loss": ..., "loss_<term>": ..., "grad_norm": ..., "skipped_steps": ..., "time": ...,
"data_time": ..., "images_per_s": ...}`` per logged iteration (values averaged over the log
window and over ranks) and ``{"mode": "val", "iter": i, "epoch": e, "<metric>": ...}`` per
evaluation. ``iter`` counts finished optimizer steps (1-based).

The progress bar needs a terminal that reports its width: with output redirected to a file, or
a terminal that reports fewer than ``MIN_BAR_COLUMNS`` columns (some CI consoles and IDEs say 0,
where tqdm would print nothing at all), progress is printed as plain lines every ``log_interval``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["WindowMeter", "TrainLogger", "MIN_BAR_COLUMNS"]

MIN_BAR_COLUMNS = 40


class WindowMeter:
    """Averages of scalars since the last :meth:`pop` (the log window)."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._sum[k] += float(v)
            self._count[k] += 1

    def pop(self) -> dict[str, float]:
        out = {k: self._sum[k] / self._count[k] for k in self._sum}
        self._sum.clear()
        self._count.clear()
        return out


def _truncate_jsonl(path: Path, keep_up_to_iter: int) -> None:
    """Drop records after ``keep_up_to_iter``: a resumed run re-logs the iterations it redoes."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if int(record.get("iter", 0)) <= keep_up_to_iter:
            kept.append(line)
    path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")


def _terminal_columns() -> int:
    """Width of the terminal behind stderr; 0 when it is not a terminal or does not say."""
    if not sys.stderr.isatty():
        return 0
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):   # no file descriptor (a replaced sys.stderr)
        return 0


class TrainLogger:
    """Writes the outputs above; every method is a no-op on ranks other than 0."""

    def __init__(self, work_dir: str | Path, *, enabled: bool, max_iters: int, start_iter: int,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.jsonl_path = Path(work_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        _truncate_jsonl(self.jsonl_path, start_iter)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(work_dir) / "tensorboard"), purge_step=start_iter + 1)
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self.info("WARNING: tensorboard is not importable; no event files are written")
        if progress_bar and _terminal_columns() >= MIN_BAR_COLUMNS:  # else plain lines (log_train)
            from tqdm import tqdm
            self._bar = tqdm(total=max_iters, initial=start_iter, desc="train", dynamic_ncols=True,
                             unit="it", file=sys.stderr, mininterval=0.5)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def log_train(self, it: int, epoch: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"mode": "train", "iter": it, "epoch": epoch, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, it)
        if self._bar is not None:
            shown = {k.replace("loss_", ""): f"{v:.4g}" for k, v in scalars.items()
                     if k.startswith("loss")}
            shown["lr"] = f"{scalars.get('lr', math.nan):.3g}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.set_description(f"train ep {epoch}", refresh=False)
        if self._bar is None:
            body = "  ".join(f"{k}: {v:.4g}" for k, v in scalars.items())
            self.info(f"iter {it} epoch {epoch}  {body}")

    def log_eval(self, it: int, epoch: int, results: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"mode": "val", "iter": it, "epoch": epoch, **results})
        if self._tb is not None:
            for k, v in results.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"val/{k}", v, it)
        body = "  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in results.items())
        self.info(f"evaluation at iteration {it}: {body}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
