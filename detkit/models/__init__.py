"""Models: layers, backbones, necks, heads and the detectors that compose them."""

from ..registry import BACKBONES, DETECTORS, HEADS, NECKS
from . import backbones, detectors, heads, layers, necks, spp_pool  # noqa: F401  (registers every part)


def build_model(cfg: dict, path: str = "model"):
    """Build a detector (or segmentor) from the ``model`` section of a config."""
    return DETECTORS.build(cfg, path)


__all__ = ["build_model", "BACKBONES", "NECKS", "HEADS", "DETECTORS"]
