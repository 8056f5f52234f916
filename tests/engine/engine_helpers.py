"""Helpers of the engine tests: small configs on the shapes data, metrics reading, a toy detector.

The toy detector has no batch-dependent layer and averages its loss over images, so a batch of
2B in one step equals two batches of B accumulated (the CNN heads normalise by the number of
objects in the batch and have BatchNorm, which makes that comparison inexact).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.detectors.base import Detector
from detkit.registry import DETECTORS

REPO = Path(__file__).resolve().parents[2]

if "EngineToyDetector" not in DETECTORS:
    @DETECTORS.register("EngineToyDetector")
    class EngineToyDetector(Detector):
        """Global-pooled CNN: class-presence logits and one mean box per image (toy, CPU-fast).

        Train: ``loss_cls`` BCE on class presence, ``loss_box`` L1 on the mean target box
        (normalised xyxy), both averaged over images. Eval: one box per image.
        """

        def __init__(self, *, num_classes: int = 4, width: int = 8, oracle: bool = False):
            super().__init__(size_divisibility=1)
            self.oracle = oracle
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=4, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.cls = nn.Linear(width, num_classes)
            self.box = nn.Linear(width, 4)
            self.num_classes = num_classes

        def forward_train(self, batch, targets):
            feats = self.body(batch.tensor)
            presence = torch.zeros(len(targets), self.num_classes, device=feats.device)
            mean_box = torch.full((len(targets), 4), 0.5, device=feats.device)
            for i, (t, (h, w)) in enumerate(zip(targets, batch.image_sizes)):
                presence[i, t["labels"]] = 1.0
                if len(t["boxes"]):
                    mean_box[i] = t["boxes"].mean(0) / torch.tensor([w, h, w, h], device=feats.device)
            return {"loss_cls": F.binary_cross_entropy_with_logits(self.cls(feats), presence),
                    "loss_box": F.l1_loss(self.box(feats).sigmoid(), mean_box)}

        def forward(self, images, targets=None):
            if self.training or not self.oracle or targets is None:
                return super().forward(images, targets)
            # Oracle mode (evaluation tests): the targets' boxes shifted by a learned offset, each
            # with every label scored by the learned classifier, so AP is far from 0 and depends
            # on the weights and on every image being evaluated exactly once.
            batch = self.preprocess(images)
            feats = self.body(batch.tensor)
            probs, shifts = self.cls(feats).sigmoid(), 6 * torch.tanh(self.box(feats))
            results = []
            for t, p, d in zip(targets, probs, shifts):
                boxes = t["boxes"].to(d.device) + d
                k = len(boxes)
                result = {"boxes": boxes.repeat_interleave(self.num_classes, 0),
                          "scores": p.repeat(k),
                          "labels": torch.arange(self.num_classes, device=d.device).repeat(k)}
                results.append(self.map_to_original(result, t))
            return results

        def forward_test(self, batch):
            feats = self.body(batch.tensor)
            scores, labels = self.cls(feats).sigmoid().max(1)
            boxes = self.box(feats).sigmoid()
            out = []
            for b, s, lab, (h, w) in zip(boxes, scores, labels, batch.image_sizes):
                xyxy = b * torch.tensor([w, h, w, h], dtype=b.dtype, device=b.device)
                xyxy = torch.cat([torch.minimum(xyxy[:2], xyxy[2:]),
                                  torch.maximum(xyxy[:2], xyxy[2:]) + 1])
                out.append({"boxes": xyxy[None], "scores": s[None], "labels": lab[None]})
            return out


# The smallest real detector config (2.4 M parameters: small checkpoints, fast CPU steps).
SMALLEST_REAL_CONFIG = REPO / "configs/yolo/yolov3_tiny_shapes.yaml"


def base_config(root: Path, *, toy: bool = False, iters: int = 4, batch: int = 2, workers: int = 0,
                **train) -> dict:
    """The YOLOv3-tiny shapes config (or the toy detector) shrunk to a few iterations on ``root``;
    ``train`` keys override the trainer settings."""
    from detkit.config import load_config

    cfg = load_config(SMALLEST_REAL_CONFIG)
    cfg["data"]["root"] = str(root)
    for split in ("train", "val"):
        cfg["data"][split]["batch_size"] = batch
        cfg["data"][split]["num_workers"] = workers
    if toy:
        cfg["model"] = {"type": "EngineToyDetector", "num_classes": 4}
    cfg["train"].update({"max_iters": iters, "log_interval": 1, "eval_interval": 0,
                         "scheduler": {"type": "multistep", "milestones": [iters // 2],
                                       "warmup_iters": 2, "warmup_factor": 0.1},
                         "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9,
                                       "weight_decay": 1e-4},
                         "checkpoint": {"interval": iters, "keep": 2, "best_metric": "bbox/AP"}})
    cfg["train"].update(train)
    return cfg


def read_metrics(work_dir: Path, mode: str = "train") -> list[dict]:
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["mode"] == mode]
