"""View augmentations: groups of random views of one image, built from config with albumentations.

A ``views`` config is a list of groups; each group makes ``count`` views with a random resized
crop to ``size`` x ``size`` (area fraction ``scale``, aspect ``ratio``) followed by its own
``transforms`` (any albumentations / detkit transform config: HorizontalFlip, ColorJitter,
ToGray, GaussianBlur, Solarize ...)::

    views:
      - {count: 2, size: 64, scale: [0.2, 1.0], transforms: [{type: HorizontalFlip}, ...]}
      - {count: 6, size: 32, scale: [0.05, 0.3], transforms: [...]}       # DINO's local crops

Views of the largest size are the *global* views (every method uses them); smaller ones are
*local* views (multi-crop, DINO) and must all share one size. Asymmetric pairs (BYOL's
blur / solarize probabilities differ per view) are two groups of ``count: 1``.
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import numpy as np

from ..data.transforms import build_transform
from ..registry import ConfigError, construct

__all__ = ["ViewGroup", "MultiView", "build_views"]


class ViewGroup:
    """``count`` views: RandomResizedCrop(size, scale, ratio) then ``transforms`` (built objects)."""

    def __init__(self, *, count: int, size: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), transforms: Sequence = ()):
        if int(count) < 1 or int(size) < 8:
            raise ValueError(f"need count >= 1 and size >= 8, got count={count}, size={size}")
        lo, hi = (float(s) for s in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must be [min, max] with 0 < min <= max <= 1, got {list(scale)}")
        self.count, self.size = int(count), int(size)
        crop = A.RandomResizedCrop(size=(self.size, self.size), scale=(lo, hi),
                                   ratio=tuple(float(r) for r in ratio))
        self.compose = A.Compose([crop, *transforms])

    def set_seed(self, seed: int) -> None:
        self.compose.set_random_seed(int(seed))

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        """UInt8[H,W,3] -> ``count`` UInt8[size,size,3] views, each with fresh random parameters."""
        return [self.compose(image=image)["image"] for _ in range(self.count)]


class MultiView:
    """All groups of a ``views`` config: image -> (global views, local views) as UInt8 arrays."""

    def __init__(self, groups: Sequence[ViewGroup]):
        self.groups = list(groups)
        sizes = sorted({g.size for g in self.groups})
        self.global_size = sizes[-1]
        self.local_size = sizes[0] if len(sizes) > 1 else None
        if len(sizes) > 2:
            raise ValueError(f"views: at most two sizes (global and local), got {sizes}")
        self.num_global = sum(g.count for g in self.groups if g.size == self.global_size)
        self.num_local = sum(g.count for g in self.groups if g.size != self.global_size)

    def set_seed(self, seed: int) -> None:
        for i, group in enumerate(self.groups):
            group.set_seed(int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]))

    def __call__(self, image: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        global_views: list[np.ndarray] = []
        local_views: list[np.ndarray] = []
        for group in self.groups:
            (global_views if group.size == self.global_size else local_views).extend(group(image))
        return global_views, local_views


def build_views(cfg: list, path: str = "views") -> MultiView:
    """A :class:`MultiView` from a YAML list of view groups (see the module docstring)."""
    if not isinstance(cfg, (list, tuple)) or not cfg:
        raise ConfigError(f"{path}: expected a non-empty list of view groups "
                          f"({{count: 2, size: 64, transforms: [...]}}), got {cfg!r}")
    groups = []
    for i, node in enumerate(cfg):
        if not isinstance(node, dict):
            raise ConfigError(f"{path}.{i}: expected a mapping, got {node!r}")
        node = dict(node)
        node["transforms"] = [build_transform(t, f"{path}.{i}.transforms.{j}")
                              for j, t in enumerate(node.get("transforms") or [])]
        groups.append(construct(ViewGroup, node, f"{path}.{i}"))
    try:
        views = MultiView(groups)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if views.num_global + views.num_local < 2:
        total = views.num_global + views.num_local
        raise ConfigError(f"{path}: needs two or more views in total, got {total}")
    return views
