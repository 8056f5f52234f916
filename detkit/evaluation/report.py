"""Human-readable evaluation reports: aligned tables and precision-recall curve PNGs.

``format_table`` and ``per_class_table`` return plain text (printed by ``tools/eval.py``);
``evaluation_report`` turns a flat results dict (``bbox/AP``, ``bbox/AP-<class>`` ...) into what
the trainer prints after an evaluation: the COCO summary block and a compact per-class table
(several classes per line, with instance counts), instead of one line of every key.
``save_pr_curve`` draws one PNG with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["format_table", "per_class_table", "metrics_table", "save_pr_curve", "safe_filename",
           "evaluation_report", "compact_class_table", "class_instances"]


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


def _split_results(results: Mapping[str, object]) -> dict[str, tuple[dict, dict]]:
    """{prefix: ({metric: value}, {metric: {class: value}})} of the float entries of ``results``.

    ``bbox/AP-cat`` is metric ``AP`` of class ``cat`` under prefix ``bbox``; keys without a
    ``/`` go under the prefix ``""``.
    """
    groups: dict[str, tuple[dict, dict]] = {}
    for key, value in results.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        prefix, _, name = key.rpartition("/")
        overall, per_class = groups.setdefault(prefix, ({}, {}))
        metric, dash, cls = name.partition("-")
        if dash and cls:
            per_class.setdefault(metric, {})[cls] = float(value)
        else:
            overall[name] = float(value)
    return groups


def compact_class_table(per_class: Mapping[str, Mapping[str, float]],
                        instances: Mapping[str, int] | None = None, *, width: int = 100,
                        name_width: int = 16) -> str:
    """Per-class values, as many classes side by side as fit in ``width`` characters.

    ``per_class``: {metric: {class: value}} (classes in the order of the first metric);
    ``instances``: ground-truth boxes per class, shown as the first column when given.
    """
    metrics = list(per_class)
    classes = list(dict.fromkeys(c for m in metrics for c in per_class[m]))
    if not classes:
        return ""
    heads = (["inst"] if instances is not None else []) + metrics
    col = max(6, *(len(h) for h in heads))

    def cell(name: str) -> str:
        shown = name if len(name) <= name_width else name[: name_width - 1] + "~"
        values = ([str(int(instances.get(name, 0)))] if instances is not None else []) + \
            [f"{float(per_class[m].get(name, math.nan)):.3f}" for m in metrics]
        return shown.ljust(name_width) + "".join(v.rjust(col + 1) for v in values)

    header = "class".ljust(name_width) + "".join(h.rjust(col + 1) for h in heads)
    per_line = max(1, (width + 3) // (len(header) + 3))
    rows = -(-len(classes) // per_line)   # column-major: read down, then across
    columns = [classes[i * rows:(i + 1) * rows] for i in range(per_line)]
    columns = [c for c in columns if c]
    lines = [" | ".join([header] * len(columns))]
    for r in range(rows):
        lines.append(" | ".join(cell(c[r]) if r < len(c) else " " * len(header) for c in columns).rstrip())
    return "\n".join(lines)


def evaluation_report(results: Mapping[str, object], instances: Mapping[str, int] | None = None, *,
                      width: int = 100) -> str:
    """The text printed after an evaluation (see the module doc); ``instances`` per class name."""
    from .coco import STAT_NAMES, summary_text  # coco.py imports this module

    parts = []
    for prefix, (overall, per_class) in _split_results(results).items():
        label = f"{prefix}: " if prefix else ""
        if all(n in overall for n in STAT_NAMES):
            parts.append(f"{prefix}\n{summary_text([overall[n] for n in STAT_NAMES])}")
            rest = {k: v for k, v in overall.items() if k not in STAT_NAMES}
        else:
            rest = overall
        if rest:
            parts.append(label + "  ".join(f"{k} {_fmt(v)}" for k, v in rest.items()))
        if per_class:
            counts = instances if prefix in ("bbox", "segm", "voc") else None
            parts.append(compact_class_table(per_class, counts, width=width))
    return "\n".join(p for p in parts if p)


def class_instances(dataset) -> dict[str, int] | None:
    """Ground-truth boxes per class name of a detkit dataset (crowd / difficult not counted),
    looking through wrappers (``.dataset`` / ``.datasets``); None when it has no box records."""
    leaves: list = []
    todo = [dataset]
    while todo and len(leaves) < 64:
        node = todo.pop()
        if hasattr(node, "records") and hasattr(node, "class_names"):
            leaves.append(node)
        else:
            todo += list(getattr(node, "datasets", None) or []) + \
                [d for d in [getattr(node, "dataset", None)] if d is not None]
    if not leaves:
        return None
    names = list(leaves[0].class_names)
    counts = np.zeros(len(names), np.int64)
    for leaf in leaves:
        for r in leaf.records:
            hard = r.iscrowd if r.difficult is None else (r.iscrowd | r.difficult)
            labels = np.asarray(r.labels)[~np.asarray(hard, bool)]
            counts += np.bincount(labels[(labels >= 0) & (labels < len(names))], minlength=len(names))
    return {str(n): int(c) for n, c in zip(names, counts)}
