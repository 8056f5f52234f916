"""What training prints (issue 29 finding 3): the COCO summary block and a compact per-class table
with instance counts instead of one line of every key, ETA on plain progress lines, evaluation
progress in a log file, and a summary at the end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from detkit.engine import evaluate as engine_evaluate
from detkit.engine import logging as train_logging
from detkit.evaluation.coco import COCOEvaluator, summary_text
from detkit.evaluation.report import class_instances, compact_class_table, evaluation_report

from engine_helpers import base_config

NAMES = [f"class name {i}" for i in range(80)]


def _coco_results(shapes_root):
    """A real COCOEvaluator result on the shapes val set (noisy copies of the ground truth)."""
    from detkit.data import build_dataset

    cfg = base_config(shapes_root)
    dataset = build_dataset(cfg["data"]["val"], root=cfg["data"]["root"])
    evaluator = COCOEvaluator.from_config({}, path="evaluation", dataset=dataset)
    gen = torch.Generator().manual_seed(0)
    for i in range(len(dataset)):
        raw = dataset.get_raw(i)
        boxes = torch.as_tensor(raw["boxes"]) + torch.randn(len(raw["boxes"]), 4, generator=gen) * 2
        target = {"image_id": raw["image_id"]}
        evaluator.process([target], [{"boxes": boxes, "labels": torch.as_tensor(raw["labels"]),
                                      "scores": torch.rand(len(boxes), generator=gen)}])
    return evaluator.evaluate(), dataset


def _table_values(text: str) -> dict[str, list[str]]:
    """{class: [cells]} parsed back from a compact table."""
    out = {}
    for line in text.splitlines()[1:]:
        for part in line.split(" | "):
            if part.strip():
                name, *cells = re.split(r"\s{2,}", part.strip())
                out[name] = cells
    return out


def test_report_is_the_summary_block_and_every_class_with_its_count(shapes_root):
    results, dataset = _coco_results(shapes_root)
    counts = class_instances(dataset)
    # An independent count: the COCO ground truth's non-crowd annotations per category.
    gt = dataset.coco_gt()
    for name, cat in zip(dataset.class_names, dataset.label_to_cat_id):
        assert counts[name] == len(gt.getAnnIds(catIds=[cat], iscrowd=False))
    text = evaluation_report(results, counts)
    stats = [results[f"bbox/{n}"] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                            "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")]
    assert summary_text(stats) in text
    table = text[text.index("class "):]
    values = _table_values(table)
    assert set(values) == set(dataset.class_names)
    for name in dataset.class_names:
        assert int(values[name][0]) == counts[name]
        assert float(values[name][1]) == pytest.approx(results[f"bbox/AP-{name}"], abs=5e-4)


def test_eighty_classes_fit_in_100_columns_and_a_third_of_the_lines():
    per_class = {"AP": {n: i / 100 for i, n in enumerate(NAMES)}}
    text = compact_class_table(per_class, {n: 1000 + i for i, n in enumerate(NAMES)}, width=100)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100 and len(lines) == 1 + 27
    values = _table_values(text)
    assert values["class name 79"] == ["1079", "0.790"]
    assert len(values) == 80


def test_log_eval_prints_the_report_and_keeps_the_whole_dict(tmp_path, capsys, shapes_root):
    results, dataset = _coco_results(shapes_root)
    logger = train_logging.TrainLogger(tmp_path, enabled=True, max_iters=10, start_iter=0,
                                       tensorboard=False, progress_bar=False)
    logger.log_eval(5, 0, results, val_dataset=dataset)
    logger.close()
    err = capsys.readouterr().err
    assert err.startswith("evaluation at iteration 5 (epoch 0):\nbbox\n Average Precision")
    assert max(len(line) for line in err.splitlines()) <= 100
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record == {"mode": "val", "iter": 5, "epoch": 0, **results}


def test_plain_progress_lines_have_position_and_eta(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 130.0])    # the logger starts at 100 s; 3 iterations done at 130 s
    monkeypatch.setattr(train_logging.time, "perf_counter", lambda: next(clock))
    logger = train_logging.TrainLogger(tmp_path, enabled=True, max_iters=12, start_iter=0,
                                       tensorboard=False, progress_bar=False)
    logger.log_train(3, 0, {"loss": 0.5, "lr": 0.01})
    logger.close()
    assert "iter 3 epoch 0  loss: 0.5  lr: 0.01  [3/12 25% eta 0:01:30]" in capsys.readouterr().err


def test_progress_lines_every_interval_with_eta():
    ticks = iter(np.arange(0.0, 200.0, 10.0))
    lines: list[str] = []
    progress = train_logging.ProgressLines(100, desc="eval", unit="img", log=lines.append,
                                           interval_s=30, clock=lambda: float(next(ticks)))
    for _ in range(10):
        progress.update(10)       # 10 images per 10 s
    assert lines == ["eval 30/100 30% eta 0:01:10 (1.0 img/s)", "eval 60/100 60% eta 0:00:40 (1.0 img/s)",
                     "eval 90/100 90% eta 0:00:10 (1.0 img/s)"]
    assert train_logging.format_duration(90061) == "1 day, 1:01:01"


def test_evaluation_without_a_terminal_logs_progress(shapes_root, monkeypatch):
    from functools import partial

    from detkit.engine.evaluate import build_val
    from detkit.models import build_model

    monkeypatch.setattr(engine_evaluate, "ProgressLines",
                        partial(train_logging.ProgressLines, interval_s=0.0))
    cfg = base_config(shapes_root, toy=True)
    _, loader, evaluator = build_val(cfg)
    lines: list[str] = []
    engine_evaluate.inference_on_loader(build_model(cfg["model"]), loader, evaluator,
                                        torch.device("cpu"), progress=False, log=lines.append)
    assert [line.split(" eta")[0] for line in lines[:-1]] == ["eval 2/8 25%", "eval 4/8 50%",
                                                              "eval 6/8 75%", "eval 8/8 100%"]
    assert lines[-1].startswith("evaluation: 8 images")


def test_summary_without_evaluation(shapes_root, tmp_path):
    cfg = base_config(shapes_root, toy=True)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"mode": "train", "iter": 7, "loss": 1.0}) + "\n")
    text = train_logging.training_summary(cfg, tmp_path, 3725.0)
    assert text.splitlines() == [
        f"training finished at iteration 7 after 1:02:05 (wall time of this run); work dir {tmp_path}",
        "no evaluation ran (no data.val / evaluation section, or eval_interval 0)"]
