"""Training output on rank 0: ``metrics.jsonl``, TensorBoard events and a tqdm progress bar.

``metrics.jsonl`` holds one JSON object per line: ``{"mode": "train", "iter": i, "epoch": e,
"lr": ..., "loss": ..., "loss_<term>": ..., "grad_norm": ..., "skipped_steps": ..., "time": ...,
"data_time": ..., "images_per_s": ...}`` per logged iteration (values averaged over the log
window and over ranks) and ``{"mode": "val", "iter": i, "epoch": e, "<metric>": ...}`` per
evaluation. ``iter`` counts finished optimizer steps (1-based).

The progress bar needs a terminal that reports its width: with output redirected to a file, or
a terminal that reports fewer than ``MIN_BAR_COLUMNS`` columns (some CI consoles and IDEs say 0,
where tqdm would print nothing at all), progress is printed as plain lines every ``log_interval``,
ending with the position and the ETA (``[120/3000 4% eta 0:41:10]``). :class:`ProgressLines`
gives the evaluation loop the same kind of lines (at most one every ``interval_s``).

After an evaluation the console gets :func:`~detkit.evaluation.report.evaluation_report` (the
COCO summary block and a compact per-class table with instance counts); ``metrics.jsonl`` keeps
the whole dict. :func:`finish_training` ends a training command: the plots of
:mod:`detkit.engine.plots` and a summary (wall time, best metric, where ``best.pth`` is).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

__all__ = ["WindowMeter", "TrainLogger", "MIN_BAR_COLUMNS", "ProgressLines", "format_duration",
           "training_summary", "finish_training"]

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


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``d days, h:mm:ss`` past a day); ``?`` for an unknown or infinite time."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} day{'s' if days > 1 else ''}, {text}" if days else text


def _position(done: int, total: int | None, rate: float) -> str:
    """``120/3000 4% eta 0:41:10`` (``120`` alone when the total is unknown)."""
    if not total:
        return str(done)
    eta = (total - done) / rate if rate > 0 else math.inf
    return f"{done}/{total} {100 * done / total:.0f}% eta {format_duration(eta)}"


class ProgressLines:
    """Plain progress lines for a log file: ``eval 120/5000 2% eta 0:06:36 (12.3 img/s)``.

    At most one line per ``interval_s`` (none for a loop that ends sooner); ``clock`` is
    replaceable for tests.
    """

    def __init__(self, total: int | None, *, desc: str, unit: str, log: Callable[[str], None],
                 interval_s: float = 30.0, clock: Callable[[], float] = time.perf_counter):
        self.total, self.desc, self.unit, self.log = total, desc, unit, log
        self.interval_s, self.clock = float(interval_s), clock
        self.done = 0
        self._start = self._last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        rate = self.done / max(now - self._start, 1e-9)
        self.log(f"{self.desc} {_position(self.done, self.total, rate)} ({rate:.1f} {self.unit}/s)")


class TrainLogger:
    """Writes the outputs above; every method is a no-op on ranks other than 0."""

    def __init__(self, work_dir: str | Path, *, enabled: bool, max_iters: int, start_iter: int,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.jsonl_path = Path(work_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self.max_iters, self.start_iter = int(max_iters), int(start_iter)
        self._started = time.perf_counter()
        self._instances: dict[int, dict[str, int] | None] = {}   # per val dataset (by id)
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
            # The rate of this run so far (evaluations included, as they will be ahead).
            rate = (it - self.start_iter) / max(time.perf_counter() - self._started, 1e-9)
            self.info(f"iter {it} epoch {epoch}  {body}  [{_position(it, self.max_iters, rate)}]")

    def log_eval(self, it: int, epoch: int, results: dict[str, float], *, val_dataset=None) -> None:
        """The whole dict to ``metrics.jsonl`` / TensorBoard; the console gets the summary block
        and a per-class table, with instance counts when ``val_dataset`` is given."""
        if not self.enabled:
            return
        self._write({"mode": "val", "iter": it, "epoch": epoch, **results})
        if self._tb is not None:
            for k, v in results.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"val/{k}", v, it)
        from ..evaluation.report import class_instances, evaluation_report

        if val_dataset is not None and id(val_dataset) not in self._instances:
            self._instances[id(val_dataset)] = class_instances(val_dataset)
        instances = self._instances.get(id(val_dataset)) if val_dataset is not None else None
        self.info(f"evaluation at iteration {it} (epoch {epoch}):\n"
                  f"{evaluation_report(results, instances)}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _best_record(records: list[dict], metric: str) -> dict | None:
    scored = [r for r in records if r.get("mode") == "val" and isinstance(r.get(metric), (int, float))]
    return max(scored, key=lambda r: r[metric]) if scored else None


def training_summary(cfg: dict, work_dir: str | Path, wall_s: float,
                     plots: dict[str, Path] | None = None) -> str:
    """The lines printed when a training command ends (reads ``metrics.jsonl``)."""
    from .plots import read_records
    from .setup import train_settings

    work_dir = Path(work_dir)
    records = read_records(work_dir / "metrics.jsonl") if (work_dir / "metrics.jsonl").is_file() else []
    last_iter = max((int(r.get("iter", 0)) for r in records), default=0)
    lines = [f"training finished at iteration {last_iter} after {format_duration(wall_s)} "
             f"(wall time of this run); work dir {work_dir}"]
    metric = train_settings(cfg)["checkpoint"]["best_metric"]
    best = _best_record(records, metric) if metric else None
    if best is not None:
        where = work_dir / "best.pth"
        lines.append(f"best {metric} {best[metric]:.4f} at iteration {best['iter']}: "
                     f"{where if where.is_file() else '(no best.pth written)'}")
    elif any(r.get("mode") == "val" for r in records):
        lines.append(f"no best.pth: train.checkpoint.best_metric '{metric}' is not among the "
                     f"evaluation results")
    else:
        lines.append("no evaluation ran (no data.val / evaluation section, or eval_interval 0)")
    if plots:
        lines.append(f"plots: {', '.join(plots)} in {work_dir}")
    return "\n".join(lines)


def finish_training(cfg: dict, work_dir: str | Path, *, wall_s: float, plots: bool = True,
                    device: str | None = None, log: Callable[[str], None] | None = None) -> None:
    """Write the plots (their val pass on ``device``, default cuda when available) and print the
    summary; rank 0 only, and a failure to plot is a line, not an error."""
    if os.environ.get("RANK", "0") != "0":
        return
    log = log or _stderr
    written: dict[str, Path] = {}
    if plots:
        try:
            from .plots import END_OF_TRAINING_MAX_IMAGES, write_plots

            written = write_plots(work_dir, cfg=cfg, max_images=END_OF_TRAINING_MAX_IMAGES,
                                  device=device, log=log)
        except Exception as e:  # noqa: BLE001 - the run is saved; pictures must not turn it into a failure
            log(f"plots: not written: {type(e).__name__}: {e}")
    log(training_summary(cfg, work_dir, wall_s, written))
