"""Class names and mask values of a semantic-segmentation dataset, read from a mapping or a file.

Masks whose pixel values are sparse ids (Cityscapes-like ``0, 7, 26``, COCO panoptic's category
ids 1..200 with gaps) train on contiguous classes ``0..K-1``: class ``k`` is the ``k``-th smallest
listed value. :func:`read_seg_classes` takes any of:

* a mapping ``{value: name}``, e.g. ``classes: {0: background, 7: road, 26: car}`` in a config;
* a ``.yaml`` / ``.yml`` file holding such a mapping, or a mapping with a ``classes`` (or
  ``names``) entry holding it (a dataset's own yaml), or a list of names (values 0..K-1);
* a ``.json`` file: COCO ``categories`` (``[{"id": 7, "name": "road"}, ...]``, e.g. COCO
  panoptic's ``panoptic_coco_categories.json`` or an annotation json with a ``categories``
  entry), or a ``{value: name}`` mapping;
* a ``.txt`` file: one ``value name`` per line, or one name per line (values 0..K-1).

Values are 0..255 (masks are 8-bit); a value left out of the list is ignored in training and
evaluation (``ignore_index``). Predictions are written back in these values
(:func:`labels_to_values`), so predicted PNGs score against the dataset's own masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from ..config import load_yaml
from ..errors import DatasetError

__all__ = ["read_seg_classes", "labels_to_values"]


def read_seg_classes(source, *, root=None) -> tuple[list[int], list[str]]:
    """(mask values ascending, class names in that order) of a mapping or a file path
    (relative to ``root``); errors name the file and the bad entry."""
    if isinstance(source, dict):
        return _from_mapping(source, "classes")
    if not isinstance(source, (str, Path)):
        raise DatasetError(f"classes: expected a {{value: name}} mapping or a file path, got {source!r}")
    path = Path(source).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root).expanduser() / path
    if not path.is_file():
        raise DatasetError(f"classes file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".txt":
        return _from_lines(text, path)
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text)
    except (ValueError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())   # YAML's messages span lines; errors are one line
        raise DatasetError(f"{path}: not readable ({type(e).__name__}: {detail})") from None
    if isinstance(data, dict):
        for key in ("categories", "classes", "names"):
            if key in data:
                data = data[key]
                break
    if isinstance(data, list) and data and all(isinstance(c, dict) for c in data):
        try:
            data = {c["id"]: c.get("name", c["id"]) for c in data}     # COCO categories
        except KeyError:
            raise DatasetError(f"{path}: every category needs an 'id'") from None
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected {{value: name}}, COCO 'categories' or a list of names")
    return _from_mapping(data, str(path))


def _from_lines(text: str, path: Path) -> tuple[list[int], list[str]]:
    lines = [ln.split(maxsplit=1) for ln in text.splitlines() if ln.strip()]
    if lines and all(len(p) == 2 and p[0].lstrip("-").isdigit() for p in lines):
        return _from_pairs([(p[0], p[1].strip()) for p in lines], str(path))
    return _from_pairs([(i, " ".join(p)) for i, p in enumerate(lines)], str(path))


def _from_mapping(mapping: dict, where: str) -> tuple[list[int], list[str]]:
    return _from_pairs(list(mapping.items()), where)


def _from_pairs(items: list[tuple], where: str) -> tuple[list[int], list[str]]:
    """(value, name) pairs -> sorted values and their names; values distinct integers 0..255."""
    if not items:
        raise DatasetError(f"{where}: no classes listed")
    pairs: dict[int, str] = {}
    for key, name in items:
        text = str(key).strip()
        if isinstance(key, bool) or not (isinstance(key, int) or text.lstrip("-").isdigit()):
            raise DatasetError(f"{where}: mask value {key!r} (for {name!r}) is not an integer")
        value = int(text)
        if not 0 <= value <= 255:
            raise DatasetError(f"{where}: mask value {key!r} (for {name!r}) is outside 0..255 (8-bit masks)")
        if value in pairs:
            raise DatasetError(f"{where}: mask value {value} is listed twice")
        pairs[value] = str(name)
    values = sorted(pairs)
    return values, [pairs[v] for v in values]


def labels_to_values(labels, values) -> np.ndarray:
    """Int[H,W] contiguous class map (0..K-1) -> UInt8[H,W] in the dataset's mask values
    (``values[k]`` for class ``k``); a label without a value is an error."""
    table = np.asarray(values, np.int64)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(table)):
        raise ValueError(f"class map has labels {int(labels.min())}..{int(labels.max())} but only "
                         f"{len(table)} mask values are known")
    if table.size and (table.min() < 0 or table.max() > 255):
        raise ValueError(f"mask values must be 0..255, got {table.tolist()}")
    return table[labels].astype(np.uint8)
