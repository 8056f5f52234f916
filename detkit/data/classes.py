"""The class count of a detector from its data: ``model.num_classes`` left unset is filled in.

:func:`dataset_class_names` reads the class names a dataset config node will have without
building it (no image is opened): the ``categories`` of a COCO json, ``class_names`` or the
``names`` of a ``data.yaml`` for YOLO, ``class_names`` (default: the 20 VOC classes) for VOC,
through ``Mosaic`` / ``ConcatDataset`` / subset wrappers. :func:`resolve_num_classes` puts their
number into ``model.num_classes`` when the config leaves it null (or out), and when both are set
and differ raises one ConfigError naming both, before a model is built: a count that is too small
otherwise fails inside the loss at the first batch, one too large trains outputs that never see
a positive.

A ``Segmentor``'s ``num_classes`` counts the labels of its class maps, background included: it is
taken from (or checked against) a ``SemanticSegDataset``'s ``classes`` / ``class_names`` (default:
background + the 20 VOC classes) and a ``CocoDetection`` with ``with_masks`` (background + its
categories); other dataset types are not checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import load_yaml
from ..errors import DatasetError
from ..registry import ConfigError
from .base import resolve_path

__all__ = ["dataset_class_names", "seg_label_names", "resolve_num_classes"]

# Detectors whose ``num_classes`` counts object classes (a Segmentor's counts background too).
DETECTOR_TYPES = ("OneStageDetector", "TwoStageDetector", "DETRDetector")


def dataset_class_names(node, root=None) -> tuple[list[str], str] | None:
    """(class names, where they were read) of a dataset config node; None for a dataset type
    that does not say (a user's own class, semantic masks). Missing / unreadable files raise
    DatasetError naming them."""
    if not isinstance(node, dict):
        return None
    root = resolve_path(root, node["root"]) if node.get("root") is not None else root
    kind = node.get("type")
    if isinstance(node.get("dataset"), dict):                  # Mosaic, subsets
        return dataset_class_names(node["dataset"], root)
    if isinstance(node.get("datasets"), list) and node["datasets"]:   # ConcatDataset: same classes
        return dataset_class_names(node["datasets"][0], root)
    if node.get("class_names") is not None:
        return [str(n) for n in node["class_names"]], f"{kind}.class_names"
    if kind == "CocoDetection" and node.get("ann_file") is not None:
        return _coco_names(resolve_path(root, str(node["ann_file"])))
    if kind == "YoloDetection" and node.get("data_yaml") is not None:
        return _yaml_names(resolve_path(root, str(node["data_yaml"])))
    if kind == "VOCDetection":
        from .voc import VOC_CLASSES
        return list(VOC_CLASSES), "VOCDetection (the 20 VOC classes)"
    return None


def _coco_names(path: Path) -> tuple[list[str], str]:
    if not path.is_file():
        raise DatasetError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            categories = json.load(f).get("categories") or []
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DatasetError(f"{path}: not a valid COCO detection json ({type(e).__name__}: {e})") from None
    return [by_id[i] for i in sorted(by_id)], str(path)


def _yaml_names(path: Path) -> tuple[list[str], str]:
    from .yolo import _class_names
    if not path.is_file():
        raise DatasetError(f"YoloDetection: data_yaml not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except Exception as e:   # noqa: BLE001 - YAML errors of the user's file: one line
        raise DatasetError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DatasetError(f"{path}: expected a mapping with 'names'")
    return _class_names(data["names"], path), str(path)


def seg_label_names(node, root=None) -> tuple[list[str], str] | None:
    """(names of the labels of a Segmentor's class maps, where they were read) of a dataset
    config node, background included; None for types that do not say."""
    if not isinstance(node, dict):
        return None
    root = resolve_path(root, node["root"]) if node.get("root") is not None else root
    if isinstance(node.get("dataset"), dict):
        return seg_label_names(node["dataset"], root)
    if isinstance(node.get("datasets"), list) and node["datasets"]:
        return seg_label_names(node["datasets"][0], root)
    kind = node.get("type")
    if kind == "SemanticSegDataset":
        if node.get("classes") is not None:
            from .seg_classes import read_seg_classes
            where = node["classes"] if isinstance(node["classes"], str) else "classes"
            return read_seg_classes(node["classes"], root=root)[1], f"{kind}.{where}"
        if node.get("class_names") is not None:
            return [str(n) for n in node["class_names"]], f"{kind}.class_names"
        from .segmentation import VOC_SEG_CLASSES
        return list(VOC_SEG_CLASSES), f"{kind} (background + the 20 VOC classes)"
    if kind == "CocoDetection" and node.get("with_masks") and node.get("ann_file") is not None:
        names, where = _coco_names(resolve_path(root, str(node["ann_file"])))
        return ["background", *names], f"background + the categories of {where}"
    return None


def _data_classes(cfg: dict, finder=dataset_class_names) -> tuple[list[str], str] | None:
    data: dict = cfg["data"] if isinstance(cfg.get("data"), dict) else {}
    # val first: the same classes as train in a smaller file (COCO val2017's json is 25 MB,
    # train2017's 450 MB); a config without val reads train.
    for split in ("val", "train"):
        node = data.get(split)
        if isinstance(node, dict) and isinstance(node.get("dataset"), dict):
            found = finder(node["dataset"], data.get("root"))
            if found is not None:
                return found[0], f"data.{split} ({found[1]})"
    return None


def resolve_num_classes(cfg: dict, *, check: bool = True) -> dict:
    """``cfg`` with ``model.num_classes`` taken from the data when null or absent (in place).

    Raises ConfigError when it is set and the data has another number of classes (``check``;
    off for evaluation, where a converted 90-class COCO model meets 80-category json on purpose),
    or when it is unset and the data does not say (a missing annotation file is named).
    """
    model = cfg.get("model")
    segmentor = isinstance(model, dict) and model.get("type") == "Segmentor"
    if not isinstance(model, dict) or not (segmentor or model.get("type") in DETECTOR_TYPES):
        return cfg
    given = model.get("num_classes")
    if given is not None and not check:
        return cfg
    try:
        found = _data_classes(cfg, seg_label_names if segmentor else dataset_class_names)
    except DatasetError as e:
        if given is not None:   # the files are not here (e.g. a config read for inference): no check
            return cfg
        raise ConfigError(f"model.num_classes is not set and the classes of the data could not be "
                          f"read: {e}") from None
    if found is None:
        if given is None:
            raise ConfigError("model.num_classes is not set and the data's dataset type does not list "
                              "its classes: set model.num_classes")
        return cfg
    names, where = found
    if given is None:
        model["num_classes"] = len(names)
    elif isinstance(given, bool) or not isinstance(given, int) or given != len(names):
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(f"model.num_classes is {given!r} but the data has {len(names)} classes "
                          f"({shown}) in {where}; set model.num_classes={len(names)}, or null to take it "
                          f"from the data")
    return cfg
