"""inference_on_loader: progress bar in images/s on rank 0 and the model-vs-metric time line."""

from __future__ import annotations

import io

import torch
from torch import nn

from detkit.engine.evaluate import inference_on_loader


class CountingModel(nn.Module):
    """Returns one detection per image; records its train/eval mode."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.modes: list[bool] = []

    def forward(self, images, targets=None):
        self.modes.append(self.training)
        return [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": self.scale.detach().clone(),
                 "labels": torch.zeros(1, dtype=torch.int64)} for _ in images]


class RecordingEvaluator:
    def reset(self):
        self.seen = []

    def process(self, targets, predictions):
        self.seen += [int(t["image_id"]) for t in targets]

    def evaluate(self):
        return {"images": float(len(self.seen))}


def test_progress_bar_and_time_split(monkeypatch):
    batches = [([torch.zeros(3, 8, 8)] * 2, [{"image_id": 2 * i}, {"image_id": 2 * i + 1}]) for i in range(3)]
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    model, evaluator, lines = CountingModel(), RecordingEvaluator(), []
    model.train()
    out = inference_on_loader(model, batches, evaluator, torch.device("cpu"), progress=True, log=lines.append)
    assert out == {"images": 6.0} and evaluator.seen == list(range(6))
    assert model.modes == [False] * 3 and model.training  # evaluated in eval mode, mode restored
    assert "eval" in stderr.getvalue() and "img" in stderr.getvalue()  # the tqdm bar (rate in img/s)
    assert len(lines) == 1 and "6 images" in lines[0] and "images/s" in lines[0]
    assert "model" in lines[0] and "metric" in lines[0] and "evaluate" in lines[0]
    stderr.truncate(0)
    inference_on_loader(model, batches, evaluator, torch.device("cpu"), progress=False, log=lines.append)
    assert stderr.getvalue() == "" and len(lines) == 2  # no bar, still the time line
