"""The README's "Quick start: your own data", run as written on a generated YOLO and COCO folder.

``tools/train.py configs/centernet/centernet_r18_coco.yaml --data DATA`` finds the format, the
splits and the class count; ``data.image_size`` is the one size key. Only what a test needs is
added to the README commands: a few iterations, no download (``model.backbone.weights=null``),
no loader workers. The README block itself is read, so it cannot drift from what is tested.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NAMES = ["cat", "dog", "bird"]   # 3 classes: the config says 80, the data decides
TEST_ONLY = ["model.backbone.weights=null", "train.max_iters=2", "train.log_interval=1",
             "train.eval_interval=2", "data.train.batch_size=2", "data.val.batch_size=2",
             "data.train.num_workers=0", "data.val.num_workers=0", "train.checkpoint.interval=2"]


def _image(rng, k: int) -> tuple[np.ndarray, list[float]]:
    """A 96x80 noise image with one bright box; returns it and the box xyxy."""
    image = rng.integers(0, 80, (80, 96, 3), dtype=np.uint8)
    x0, y0 = 10 + 3 * k, 12 + 2 * k
    image[y0:y0 + 30, x0:x0 + 40] = 230
    return image, [x0, y0, x0 + 40, y0 + 30]


def make_yolo_folder(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(n):
            image, (x0, y0, x1, y1) = _image(rng, k)
            cv2.imwrite(str(root / "images" / split / f"{k}.jpg"), image)
            cx, cy, w, h = (x0 + x1) / 2 / 96, (y0 + y1) / 2 / 80, (x1 - x0) / 96, (y1 - y0) / 80
            (root / "labels" / split / f"{k}.txt").write_text(f"{k % 3} {cx} {cy} {w} {h}\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train",
                                                    "val": "images/val", "names": NAMES}))
    return root


def make_coco_folder(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """COCO 2017 layout: annotations/instances_{train,val}2017.json, {train,val}2017/ images;
    sparse category ids (5, 9, 17) as real exports have."""
    rng = np.random.default_rng(1)
    cats = [{"id": c, "name": n} for c, n in zip((5, 9, 17), NAMES)]
    (root / "annotations").mkdir(parents=True)
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir()
        images, anns = [], []
        for k in range(n):
            image, (x0, y0, x1, y1) = _image(rng, k)
            cv2.imwrite(str(root / split / f"{k:06d}.jpg"), image)
            images.append({"id": k + 1, "file_name": f"{k:06d}.jpg", "height": 80, "width": 96})
            anns.append({"id": k + 1, "image_id": k + 1, "category_id": cats[k % 3]["id"], "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def readme_commands() -> list[list[str]]:
    """The ``tools/train.py`` lines of the README quick start, as argument lists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start: your own data", 1)[1].split("\n## ", 1)[0]
    lines = [ln.split("#")[0].strip() for ln in re.findall(r"^python tools/train\.py .*$", section, re.M)]
    return [shlex.split(ln)[2:] for ln in lines]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"detkit_tool_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool   # tools/infer.py declares a dataclass, which looks itself up there
    spec.loader.exec_module(tool)
    return tool


def run_train(args: list[str], capsys) -> tuple[int, str]:
    code = load_tool("train").main(args)
    return code, capsys.readouterr().err


def test_readme_quick_start_lists_every_format():
    commands = readme_commands()
    data_args = [c[c.index("--data") + 1] for c in commands if "--data" in c]
    assert len(data_args) >= 4, commands   # data.yaml, YOLO folder, COCO folder, VOC folder


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_readme_quick_start_trains_on_a_generated_folder(fmt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    data = (make_yolo_folder if fmt == "yolo" else make_coco_folder)(tmp_path / fmt)
    command = next(c for c in readme_commands() if "data.image_size=320" in c)
    assert command[-1] == "data.image_size=320"   # --set comes last: the test's values extend it
    command[command.index("--data") + 1] = str(data)
    work = tmp_path / "work"
    args = [command[0], "--work-dir", str(work), "--device", "cpu", *command[1:], *TEST_ONLY]
    code, err = run_train(args, capsys)
    assert code == 0, err
    resolved = yaml.safe_load((work / "config.yaml").read_text())
    assert resolved["model"]["num_classes"] == 3                       # from the data, not the 80
    assert resolved["data"]["train"]["pipeline"][0] == {"type": "Letterbox", "size": 320, "pad_value": 0}
    dataset = resolved["data"]["val"]["dataset"]
    assert dataset["type"] == ("YoloDetection" if fmt == "yolo" else "CocoDetection")
    assert (work / "last.pth").is_file()
    assert "Traceback" not in err
    if fmt == "coco":
        check_the_checkpoint_alone_evaluates_and_predicts(work / "last.pth", data, tmp_path, capsys)


def check_the_checkpoint_alone_evaluates_and_predicts(ckpt: Path, data: Path, tmp_path: Path, capsys):
    """The README's next two lines: ``tools/eval.py CKPT`` and ``tools/infer.py CKPT INPUT`` with
    the config taken from the checkpoint (both needed CONFIG first); ``--no-draw`` does not say
    where annotated images are, since none are written."""
    out_json = tmp_path / "metrics.json"
    assert load_tool("eval").main([str(ckpt), "--device", "cpu", "--out", str(out_json)]) == 0, \
        capsys.readouterr().err
    metrics = json.loads(out_json.read_text())
    assert "bbox/AP" in metrics and "bbox/AP50" in metrics
    capsys.readouterr()
    out = tmp_path / "pred"
    image = data / "val2017" / "000000.jpg"
    assert load_tool("infer").main([str(ckpt), str(image), "--out", str(out), "--no-draw",
                                    "--score-thr", "0.0"]) == 0
    printed = capsys.readouterr().out
    assert "annotated images" not in printed and f"predictions in {out / 'predictions.json'}" in printed
    records = json.loads((out / "predictions.json").read_text())
    assert records and {r["category_name"] for r in records} <= set(NAMES)   # names from the checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["predictions.json"]


def test_the_class_count_in_the_config_must_match_the_data(tmp_path, capsys, monkeypatch):
    """``--set model.num_classes=2`` on 3-class data: one error naming both counts, exit 2,
    before any model is built (it used to fail inside the loss at the first batch)."""
    monkeypatch.chdir(REPO)
    data = make_yolo_folder(tmp_path / "yolo", 2, 1)
    code, err = run_train(["configs/centernet/centernet_r18_coco.yaml", "--data", str(data / "data.yaml"),
                           "--work-dir", str(tmp_path / "w"), "--set", "model.num_classes=2",
                           *TEST_ONLY], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: model.num_classes is 2 but the data has 3 "
                                                   "classes (cat, dog, bird)")
    assert len(err.strip().splitlines()) == 1 or "Traceback" not in err


def test_offline_first_run_is_one_error_line(tmp_path, capsys, monkeypatch):
    """No network: the ImageNet download of a FrozenBN R50 fails with one line naming the two
    overrides that train from scratch, exit code 2 (was a ~100-line traceback)."""
    import torchvision.models._api as tv_api

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", offline)
    monkeypatch.chdir(REPO)
    data = make_coco_folder(tmp_path / "coco", 2, 1)
    code, err = run_train(["configs/faster_rcnn/faster_rcnn_r50_fpn_coco.yaml", "--data", str(data),
                           "--work-dir", str(tmp_path / "w"), "--set", "train.max_iters=1",
                           "data.train.num_workers=0", "data.val.num_workers=0"], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "--set model.backbone.weights=null model.backbone.norm=BN" in lines[0]
    assert "IMAGENET1K_V1" in lines[0] and "Temporary failure in name resolution" in lines[0]


def test_warnings_are_one_plain_line(tmp_path):
    """A tool's warning is ``warning: message`` (was ``/path/file.py:12: UserWarning: message``
    followed by the quoted source line)."""
    import subprocess
    script = ("import sys; from detkit.cli import run_cli; from detkit.errors import warn_once\n"
              "sys.exit(run_cli(lambda argv: warn_once('3 boxes clipped to the image') or 0, []))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert done.returncode == 0 and done.stderr == "warning: 3 boxes clipped to the image\n"


def test_device_choice_narrows_the_visible_gpus(monkeypatch):
    import torch

    from detkit.device import select_training_device
    from detkit.errors import DetkitError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    select_training_device("cpu")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    select_training_device("cuda:1")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "3"
    with pytest.raises(DetkitError, match="only 1 GPUs are visible"):
        select_training_device("cuda:4")
    with pytest.raises(DetkitError, match="expected cpu, cuda or cuda:N"):
        select_training_device("gpu0")


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_the_download_error_names_norm_only_for_frozen_bn(norm, monkeypatch):
    import torchvision.models._api as tv_api

    from detkit.models import BACKBONES
    from detkit.models.pretrained import PretrainedWeightsError

    def offline(self, *args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError) as info:
        BACKBONES.build({"type": "ResNet", "depth": 18, "norm": norm, "weights": "IMAGENET1K_V1"},
                        "model.backbone")
    message = str(info.value)
    assert "\n" not in message and "model.backbone.weights=null" in message
    assert ("model.backbone.norm=BN" in message) == (norm == "FrozenBN")
    assert "https://download.pytorch.org/models/resnet18" in message   # where to fetch it by hand
