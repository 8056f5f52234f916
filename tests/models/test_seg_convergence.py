"""Convergence: a small Segmentor fits 8 shapes images (dataset -> model -> SegEvaluator)."""

from __future__ import annotations

import pytest
import torch

from detkit.data import build_dataset
from detkit.data.shapes import generate
from detkit.evaluation import SegEvaluator
from detkit.models import build_model

NAMES = ["background", "circle", "square", "triangle", "star"]


@pytest.mark.slow
def test_segmentor_fits_shapes_masks(tmp_path):
    generate(tmp_path, 8, 0, size=64, seed=0)
    dataset = build_dataset({"dataset": {"type": "SemanticSegDataset", "img_dir": "train",
                                         "mask_dir": "masks/train", "class_names": NAMES},
                             "pipeline": []}, root=tmp_path)
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    torch.manual_seed(0)
    model = build_model({
        "type": "Segmentor", "num_classes": 5,
        "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c2", "c3"]},
        "neck": {"type": "FPN", "out_channels": 32},
        "head": {"type": "SemanticHead", "in_features": ["p2", "p3"], "channels": 32}})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    first = None
    for _ in range(200):
        loss = model(list(images), list(targets))["loss_sem_seg"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    model.eval()
    evaluator = SegEvaluator(num_classes=5, class_names=NAMES)
    with torch.no_grad():
        evaluator.process(list(targets), model(list(images), list(targets)))
    metrics = evaluator.evaluate()
    assert loss.item() < 0.3 * first
    # measured 0.81 after 200 iterations (~30 s); predicting only background gives ~0.18
    assert metrics["sem_seg/mIoU"] > 0.65, evaluator.report()
