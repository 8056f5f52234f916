"""Read every image and annotation of a config's splits up front and list all problems at once.

Training finds a corrupt image only when it is drawn (iteration 12 of a run, or the final
evaluation); :func:`check_data` builds each split's dataset (which parses and validates every
annotation) and then loads every sample's raw data (image, EXIF frame against the annotated
size, masks), so one pass reports every unreadable file with its split. ``tools/check_data.py``
prints the report; ``skip_bad_images`` does not hide problems here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import DetkitError
from .builder import _leaf_datasets, build_dataset

__all__ = ["SplitReport", "check_data", "format_report"]

SPLITS = ("train", "val", "test")


@dataclass
class SplitReport:
    """What one split holds and every problem found in it (one line each, file named)."""

    split: str
    images: int = 0
    boxes: int = 0
    classes: int = 0
    problems: list[str] = field(default_factory=list)
    box_fixes: dict = field(default_factory=dict)   # boxes clipped / dropped while parsing


def _check_sample(dataset, index: int) -> str | None:
    try:
        dataset.get_raw(index)
    except (DetkitError, ValueError, OSError) as e:
        return str(e).splitlines()[0]
    return None


def check_split(split_cfg: dict, root, split: str, *, workers: int = 4) -> SplitReport:
    """Build ``data.<split>`` and load every sample of it (``workers`` threads read images)."""
    report = SplitReport(split)
    try:
        dataset = build_dataset(split_cfg, root=root, path=f"data.{split}")
    except (DetkitError, ValueError, OSError) as e:
        report.problems.append(f"the dataset cannot be built: {e}")
        return report
    for leaf in _leaf_datasets(dataset):
        report.images += len(leaf.records)
        report.boxes += sum(len(r.labels) for r in leaf.records)
        report.classes = max(report.classes, len(getattr(leaf, "class_names", [])))
        for key, count in (leaf.box_report or {}).items():
            report.box_fixes[key] = report.box_fixes.get(key, 0) + count
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = pool.map(lambda i, d=leaf: _check_sample(d, i), range(len(leaf.records)))
            report.problems += [p for p in found if p is not None]
    return report


def check_data(cfg: dict, *, workers: int = 4) -> list[SplitReport]:
    """A :class:`SplitReport` for each of ``data.train`` / ``val`` / ``test`` the config has."""
    data = cfg.get("data") or {}
    return [check_split(data[s], data.get("root"), s, workers=workers)
            for s in SPLITS if isinstance(data.get(s), dict)]


def format_report(reports: list[SplitReport], max_lines: int = 50) -> str:
    """The report as text: one summary line per split, then its problems (at most ``max_lines``)."""
    lines = []
    for r in reports:
        fixes = ", ".join(f"{n} {k}" for k, n in r.box_fixes.items() if n)
        lines.append(f"data.{r.split}: {r.images} images, {r.boxes} boxes, {r.classes} classes"
                     f"{f' (boxes fixed while parsing: {fixes})' if fixes else ''}; "
                     f"{len(r.problems)} problem{'s' if len(r.problems) != 1 else ''}")
        lines += [f"  {p}" for p in r.problems[:max_lines]]
        if len(r.problems) > max_lines:
            lines.append(f"  ... and {len(r.problems) - max_lines} more")
    total = sum(len(r.problems) for r in reports)
    lines.append("no problems found" if total == 0 else f"{total} problems found")
    return "\n".join(lines)
