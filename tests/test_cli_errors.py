"""User-data problems through the real command-line tools: exit code 2, the file named, no traceback.

The data is a small Ultralytics-style YOLO dataset (data.yaml); the model is the tiny YOLOv3 of
the shapes config, inherited through an absolute ``_base_`` path.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from detkit.cli import run_cli, user_message
from detkit.data import build_dataloader, build_dataset
from detkit.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs/yolo/yolov3_tiny_shapes.yaml"
NAMES = ["circle", "square", "triangle", "star"]


def make_yolo_data(root: Path, num_train: int = 4, num_val: int = 2) -> Path:
    """images/{train,val}/*.jpg with one box each, labels/..., data.yaml (dict names); returns it."""
    rng = np.random.default_rng(0)
    for split, n in (("train", num_train), ("val", num_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            image[16:40, 20:44] = 220
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), image)
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 4} 0.5 0.4375 0.375 0.375\n")
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                         "names": dict(enumerate(NAMES))}))
    return data_yaml


def write_config(tmp_path: Path, data_yaml: Path, workers: int = 1) -> Path:
    dataset = {"_delete_": True, "type": "YoloDetection", "data_yaml": str(data_yaml)}
    cfg = {"_base_": [str(BASE_CONFIG)],   # absolute path
           "data": {"root": None,
                    "train": {"dataset": dict(dataset, split="train"), "batch_size": 2,
                              "num_workers": workers},
                    "val": {"dataset": dict(dataset, split="val"), "batch_size": 2, "num_workers": workers}},
           "train": {"max_iters": 4, "log_interval": 1, "eval_interval": 0,
                     "checkpoint": {"interval": 100, "keep": 0}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_tool(tool: str, *args, timeout: int = 540) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DETKIT_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_clean_error(proc: subprocess.CompletedProcess, *names: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: " in proc.stderr
    for name in names:
        assert name in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_train_truncated_jpeg_in_a_worker(tmp_path):
    data_yaml = make_yolo_data(tmp_path / "data")
    bad = tmp_path / "data" / "images" / "train" / "2.jpg"
    truncate(bad)
    cfg = write_config(tmp_path, data_yaml, workers=1)
    proc = run_tool("train.py", cfg, "--work-dir", tmp_path / "work")
    assert_clean_error(proc, str(bad), "truncated JPEG", "data.train.skip_bad_images: true")
    assert len(proc.stderr.strip().splitlines()) < 8   # the error, not a wall of text


@pytest.mark.slow
def test_train_missing_root_and_bad_label(tmp_path):
    data_yaml = make_yolo_data(tmp_path / "data")
    cfg = write_config(tmp_path, data_yaml, workers=0)
    missing = tmp_path / "nowhere"
    proc = run_tool("train.py", cfg, "--work-dir", tmp_path / "work",
                    "--set", f"data.root={missing}", "data.train.dataset.data_yaml=data.yaml")
    assert_clean_error(proc, str(missing / "data.yaml"), f"data.root '{missing}' does not exist")

    label = tmp_path / "data" / "labels" / "train" / "1.txt"
    label.write_text("0 0.5 0.5 0.2\n")
    proc = run_tool("train.py", cfg, "--work-dir", tmp_path / "work")
    assert_clean_error(proc, f"{label}:1", "expected 'cls cx cy w h'")


@pytest.mark.slow
def test_eval_bad_image_in_a_worker_and_infer_missing_files(tmp_path):
    from detkit.config import load_config
    from detkit.models import build_model

    data_yaml = make_yolo_data(tmp_path / "data")
    cfg = write_config(tmp_path, data_yaml, workers=1)
    ckpt = tmp_path / "weights.pth"
    torch.save({"model": build_model(load_config(cfg)["model"]).state_dict()}, ckpt)
    bad = tmp_path / "data" / "images" / "val" / "1.jpg"
    truncate(bad)
    proc = run_tool("eval.py", cfg, ckpt, "--device", "cpu")
    assert_clean_error(proc, str(bad), "data.val.skip_bad_images")

    missing = tmp_path / "missing.json"
    proc = run_tool("infer.py", cfg, ckpt, tmp_path / "data" / "images" / "train", "--out",
                    tmp_path / "out", "--coco-gt", missing)
    assert_clean_error(proc, str(missing))
    proc = run_tool("infer.py", cfg, tmp_path / "nope.pth", tmp_path, "--out", tmp_path / "out")
    assert_clean_error(proc, "nope.pth")


def test_skip_bad_images_on_the_split_skips_and_counts(tmp_path):
    data_yaml = make_yolo_data(tmp_path / "data")
    truncate(tmp_path / "data" / "images" / "train" / "2.jpg")
    split = {"dataset": {"type": "YoloDetection", "data_yaml": str(data_yaml)}, "batch_size": 4,
             "num_workers": 0}
    dataset = build_dataset(split, path="data.train")
    with pytest.raises(DatasetError, match=r"2\.jpg.*data\.train\.skip_bad_images: true"):
        next(iter(build_dataloader(split, dataset, train=True, seed=0)))
    dataset = build_dataset(dict(split, skip_bad_images=True), path="data.train")
    with pytest.warns(UserWarning, match=r"skipping unreadable image.*2\.jpg") as record:
        images, _ = next(iter(build_dataloader(split, dataset, train=True, seed=0)))
    assert len(images) == 4 and dataset.num_skipped == 1
    assert record[0].filename == __file__      # the line that iterates, not detkit's or torch's


def test_worker_message_is_unwrapped_and_debug_shows_the_traceback(capsys, monkeypatch):
    message = "images/3.jpg: truncated JPEG file\n  second line"
    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback "
                           "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                           f"detkit.errors.DatasetError: {message}\n")
    assert user_message(wrapped) == message

    def fail(argv):
        raise wrapped

    monkeypatch.delenv("DETKIT_DEBUG", raising=False)
    assert run_cli(fail, []) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert run_cli(fail, ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("DETKIT_DEBUG", "1")
    assert run_cli(fail, []) == 2
    assert "Traceback" in capsys.readouterr().err

    def bug(argv):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_cli(bug, [])


def _tool_main(tool: str):
    """A tool's main() in this process (the same run_cli path as the subprocess, without the
    interpreter start)."""
    spec = importlib.util.spec_from_file_location(f"detkit_{tool}_cli", REPO / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("tool", ["train", "eval"])
def test_missing_annotation_file_and_image_folder(tmp_path, capsys, monkeypatch, tool):
    from detkit.data.shapes import generate

    monkeypatch.delenv("DETKIT_DEBUG", raising=False)
    generate(tmp_path / "shapes", num_train=2, num_val=2, size=32, seed=0)
    main = _tool_main(tool)
    args = [str(REPO / "configs/centernet/centernet_r18_shapes.yaml")]
    args += ["--work-dir", str(tmp_path / "w")] if tool == "train" else [str(tmp_path / "x.pth")]
    split = "train" if tool == "train" else "val"
    root = tmp_path / "shapes"
    cases = [(f"data.{split}.dataset.ann_file=missing.json", str(root / "missing.json")),
             (f"data.{split}.dataset.img_dir=nowhere", f"image folder not found: {root / 'nowhere'}")]
    for override, named in cases:
        assert main([*args, "--set", f"data.root={root}", override]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and err.startswith("error: ")


def test_run_training_gives_every_engine_tool_the_sigterm_exit_code():
    """tools/train.py and tools/pretrain.py share run_training: a SIGTERM that saved last.pth
    ends with 143 (torchrun restarts the workers), the config and work dir reach the engine."""
    from detkit.cli import run_training, training_parser
    from detkit.engine.preemption import TrainingInterrupted

    seen = {}

    def interrupted(cfg, work_dir, *, resume, deterministic):
        seen.update(model=cfg["model"]["type"], work_dir=work_dir, resume=resume)
        raise TrainingInterrupted(5)

    parser = training_parser(None, config_help="config", set_example="a=1")
    args = parser.parse_args([str(REPO / "configs/pretrain/byol_r18_shapes.yaml"), "--resume"])
    assert run_training(interrupted, args) == 143
    assert seen == {"model": "BYOL", "work_dir": Path("work_dirs/byol_r18_shapes"), "resume": True}
