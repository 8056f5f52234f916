"""The shared base of training-set wrappers that build a new raw sample from the raw samples of
the dataset they wrap (``Mosaic``, ``MixUp``): the config node, the sample path and the
pass-throughs the trainer and evaluator read from a training set."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ..registry import ConfigError, closest
from .base import to_sample

__all__ = ["RawSampleWrapper"]


class RawSampleWrapper(Dataset):
    """Subclasses set ``dataset`` / ``transforms``, define ``get_raw(index)`` and list their
    constructor's config keys in ``ARGUMENTS`` (``REQUIRED``: those without a default)."""

    ARGUMENTS: tuple[str, ...] = ()
    REQUIRED: tuple[str, ...] = ()
    def __init__(self, dataset: Any, *, transforms=None):
        self.dataset = dataset         # the wrapped dataset (anything with get_raw)
        self.transforms = transforms   # the split's pipeline, applied to the new raw sample

    @classmethod
    def from_config(cls, cfg: dict, *, path: str, root=None, transforms=None):
        from .builder import build_dataset_node
        name, cfg = cls.__name__, dict(cfg)
        if not isinstance(cfg.get("dataset"), dict):
            raise ConfigError(f"{path}.dataset: {name} needs the dataset to wrap "
                              f"({{type: CocoDetection, ...}})")
        for key in cls.REQUIRED:
            if key not in cfg:
                raise ConfigError(f"{path}: '{name}' needs the argument '{key}'")
        inner = build_dataset_node(cfg.pop("dataset"), f"{path}.dataset", root=root, transforms=None)
        for key in cfg:
            if key not in cls.ARGUMENTS:
                hint = closest(key, cls.ARGUMENTS)
                raise ConfigError(f"{path}.{key}: '{name}' has no argument '{key}'{hint}; "
                                  f"valid arguments: dataset, {', '.join(cls.ARGUMENTS)}")
        try:
            return cls(inner, transforms=transforms, **cfg)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path} ({name}): {e}") from e

    def get_raw(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        raw = self.get_raw(index)
        if self.transforms is not None:
            raw = self.transforms(raw)
        return to_sample(raw)

    def get_raw_checked(self, index: int) -> dict:
        return self.get_raw(index)

    def _inner_raw(self, index: int) -> dict:
        getter = getattr(self.dataset, "get_raw_checked", self.dataset.get_raw)
        return getter(index)

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    @property
    def label_to_cat_id(self) -> list[int]:
        return self.dataset.label_to_cat_id

    @property
    def seg_class_names(self) -> list[str]:
        return self.dataset.seg_class_names

    def coco_gt(self):
        return self.dataset.coco_gt()
