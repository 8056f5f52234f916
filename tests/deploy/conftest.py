"""Shared helpers of the deployment tests: small models with random but *confident* weights.

A freshly initialised detector scores every candidate alike (YOLO's objectness prior 0.01,
CenterNet's heatmap bias -2.19, untrained BN statistics), so its detections are a tie-break
lottery. ``confident_model`` re-draws the prediction layers with larger weights and sets the BN
statistics from two shapes images, which gives spread-out scores and boxes of plausible sizes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from detkit.config import load_config
from detkit.deploy.check import sample_images
from detkit.deploy.export import exportable
from detkit.models import build_model

ROOT = Path(__file__).resolve().parents[2]

# layer name parts -> weight scale (x 1/sqrt(fan_in)); box regressions stay small
SCALES = (("deltas", 0.1), ("bbox_pred", 0.1), ("box_maps", 0.1), ("offset", 0.1),
          ("heatmap", 0.3), ("rpn", 1.0), ("cls_score", 0.5))


def _make_confident(model: nn.Module, images: torch.Tensor, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in ("head", "rpn", "roi_head"):
            for name, mod in (getattr(model, part).named_modules() if hasattr(model, part) else []):
                if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.dim() > 1:
                    full = f"{part}.{name}"
                    scale = next((s for key, s in SCALES if key in full), 2.0)
                    mod.weight.normal_(0, scale / mod.weight[0].numel() ** 0.5, generator=g)
                    if mod.bias is not None:
                        mod.bias.zero_()
        if hasattr(getattr(model, "head", None), "wh"):
            model.head.wh[-1].bias.fill_(4.0)      # CenterNet: boxes of about 4 cells
        for mod in model.modules():                # BN statistics of real images
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
                mod.momentum = 1.0
        exportable(model)(images)
    return model.eval()


@pytest.fixture(scope="session")
def confident_model():
    """``confident_model(config, overrides)`` -> an eval-mode model (cached per arguments)."""
    cache: dict = {}

    def build(config: str, overrides: tuple[str, ...] = ()) -> nn.Module:
        key = (config, overrides)
        if key not in cache:
            torch.manual_seed(0)
            cfg = load_config(ROOT / config, list(overrides))
            cache[key] = _make_confident(build_model(cfg["model"]), sample_images(2, 128, 128, seed=7))
        return cache[key]

    return build
