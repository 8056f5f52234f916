"""Human-readable evaluation reports: aligned tables and precision-recall curve PNGs.

``format_table`` and ``per_class_table`` return plain text (printed by ``tools/eval.py`` and the
trainer); ``save_pr_curve`` draws one PNG with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["format_table", "per_class_table", "metrics_table", "save_pr_curve", "safe_filename"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """A fixed-width text table; floats are printed with 4 decimals, NaN as ``nan``."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:]])


def per_class_table(columns: Mapping[str, Mapping[str, float]], class_names: Sequence[str]) -> str:
    """Table with one row per class and one column per entry of ``columns`` ({column: {class: v}})."""
    rows = [[name, *(float(col.get(name, float("nan"))) for col in columns.values())]
            for name in class_names]
    return format_table(rows, ["class", *columns])


def metrics_table(metrics: Mapping[str, float]) -> str:
    """Two-column table of a flat metrics dict (the fallback report of any evaluator)."""
    return format_table([[k, float(v)] for k, v in metrics.items()], ["metric", "value"])


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def save_pr_curve(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str,
                  path: str | Path) -> Path:
    """Plot precision over recall, one line per entry of ``curves`` ({label: (recall, precision)})."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    for label, (recall, precision) in curves.items():
        ax.plot(np.asarray(recall), np.asarray(precision), label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path
