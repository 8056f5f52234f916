"""``build_evaluator(cfg, dataset)``: the evaluator named by a config's ``evaluation`` section."""

from __future__ import annotations

from ..registry import EVALUATORS, ConfigError

__all__ = ["build_evaluator"]


def _unwrap(dataset):
    """The dataset that carries ``coco_gt``/``class_names`` (through Subset-like wrappers)."""
    seen = 0
    while dataset is not None and not hasattr(dataset, "class_names") and hasattr(dataset, "dataset") \
            and seen < 8:
        dataset, seen = dataset.dataset, seen + 1
    return dataset


def build_evaluator(cfg: dict, dataset=None, path: str = "evaluation"):
    """Build ``cfg`` (``{type: COCOEvaluator | VOCEvaluator | SegEvaluator, ...}``).

    The val ``dataset`` supplies what the config leaves out: ``coco_gt()``, ``label_to_cat_id``
    and ``class_names`` for detection evaluators, the class count for ``SegEvaluator``.
    """
    if cfg is None:
        raise ConfigError(f"{path}: missing evaluator config (e.g. {{type: COCOEvaluator}})")
    if isinstance(cfg, dict) and "type" in cfg:
        cls = EVALUATORS.get(cfg["type"], f"{path}.type")
        if not hasattr(cls, "from_config"):  # a user's evaluator that needs nothing from the dataset
            return EVALUATORS.build(cfg, path)
    return EVALUATORS.build(cfg, path, dataset=_unwrap(dataset))
