"""Plots after training (tools/train.py) and from tools/plot.py, on a 4-iteration shapes run."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.config import dump_config
from detkit.engine import plots as engine_plots
from detkit.evaluation.report import class_instances
from detkit.plots import _curve_keys, plot_results

from engine_helpers import REPO, base_config, read_metrics

sys.path.insert(0, str(REPO / "tools"))


@pytest.fixture(scope="module")
def trained_run(shapes_root, tmp_path_factory):
    """A tools/train.py run (4 iterations, evaluations at 2 and 4) and its stderr."""
    import train as train_tool

    tmp = tmp_path_factory.mktemp("plots_run")
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(dump_config(base_config(shapes_root, iters=4, eval_interval=2)))
    work = tmp / "work"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert train_tool.main([str(cfg_path), "--work-dir", str(work)]) == 0
    return work, err.getvalue()


def _image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def test_training_writes_the_plots_and_a_summary(trained_run):
    work, stderr = trained_run
    for name in engine_plots.PLOT_FILES:
        image = _image(work / name)
        assert min(image.shape[:2]) > 200 and image.std() > 5   # a picture, not a blank canvas
    best = max(read_metrics(work, "val"), key=lambda r: r["bbox/AP"])
    assert f"best bbox/AP {best['bbox/AP']:.4f} at iteration {best['iter']}: {work / 'best.pth'}" in stderr
    assert "training finished at iteration 4 after 0:00:" in stderr
    assert "plots: results.png, labels.png, confusion_matrix.png, val_predictions.jpg" in stderr


def test_the_plots_are_in_tensorboard(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, _ = trained_run
    events = EventAccumulator(str(work / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {f"plots/{Path(n).stem}" for n in engine_plots.PLOT_FILES} <= tags
    shown = events.Images("plots/confusion_matrix")[-1]
    assert (shown.height, shown.width) == _image(work / "confusion_matrix.png").shape[:2]


def test_plot_tool_on_a_running_run(trained_run, tmp_path):
    """A run in progress: metrics.jsonl with a half-written last line, only last.pth so far."""
    import plot as plot_tool

    work, _ = trained_run
    running = tmp_path / "running"
    running.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "last.pth"):
        shutil.copy(work / name, running / name)
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"mode": "train", "iter": 5, "lo')
    assert plot_tool.main([str(running), "--no-tensorboard", "--device", "cpu"]) == 0
    for name in engine_plots.PLOT_FILES:
        _image(running / name)
    assert not (running / "tensorboard").exists()


def test_plot_tool_on_a_folder_that_is_no_work_dir(tmp_path, capsys):
    import plot as plot_tool

    assert plot_tool.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} is not a training work dir (no config.yaml)"


def test_the_confusion_matrix_counts_every_val_box_once(trained_run):
    """Its ground-truth rows add up to the val set's boxes per class (an independent count)."""
    import torch

    from detkit.config import load_config
    from detkit.data import build_dataset

    work, _ = trained_run
    cfg = load_config(work / "config.yaml")
    confusion, samples, seen, total, it = engine_plots._val_pass(
        cfg, work / "last.pth", torch.device("cpu"), None, 3, 0.25, 0.5)
    counts = class_instances(build_dataset(cfg["data"]["val"], root=cfg["data"]["root"]))
    matrix = confusion.evaluate()
    np.testing.assert_array_equal(matrix[:-1].sum(axis=1), list(counts.values()))
    assert (seen, total, it, len(samples)) == (8, 8, 4, 3)


def test_results_curves_skip_per_class_keys_and_cut_lines(tmp_path):
    records = [{"mode": "train", "iter": i, "loss": 2.0 / i, "loss_cls": 1.0 / i, "lr": 0.01} for i in (1, 2)]
    records.append({"mode": "val", "iter": 2, "bbox/AP": 0.1, "bbox/AP50": 0.3, "bbox/AP-cat": 0.2})
    assert _curve_keys(records) == (["loss", "loss_cls", "lr"], ["bbox/AP", "bbox/AP50"])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"mode": "tr')
    assert engine_plots.read_records(path) == records
    _image(plot_results(records, tmp_path / "results.png"))
    with pytest.raises(ValueError, match="no loss or metric"):
        plot_results([{"mode": "train", "iter": 1}], tmp_path / "empty.png")


def test_no_plots_flag(shapes_root, tmp_path):
    import train as train_tool

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(base_config(shapes_root, toy=True, iters=2)))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert train_tool.main([str(cfg_path), "--work-dir", str(tmp_path / "w"), "--no-plots",
                                "--device", "cpu"]) == 0
    assert not list((tmp_path / "w").glob("*.png")) and "training finished at iteration 2" in err.getvalue()
