"""tools/check_data.py: every unreadable image of every split in one report, before training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("detkit_tool_check_data", REPO / "tools" / "check_data.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    return tool


def coco_folder(root: Path) -> Path:
    """annotations/instances_{train,val}.json + {train,val}/ with 3 images each, one box each."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / split).mkdir()
        images, anns = [], []
        for k in range(3):
            image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
            cv2.imwrite(str(root / split / f"{k}.jpg"), image)
            images.append({"id": k + 1, "file_name": f"{k}.jpg", "height": 40, "width": 56})
            anns.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [5, 5, 20, 20],
                         "area": 400, "iscrowd": 0})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def run(args, capsys) -> tuple[int, str, str]:
    code = load_tool().main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_bad_image_of_every_split_is_listed_at_once(tmp_path, capsys):
    data = coco_folder(tmp_path / "coco")
    first = data / "train" / "1.jpg"
    first.write_bytes(first.read_bytes()[:200])            # truncated JPEG
    (data / "val" / "2.jpg").write_bytes(b"")               # 0-byte file
    (data / "val" / "0.jpg").unlink()                       # missing
    code, out, _ = run(["configs/centernet/centernet_r18_coco.yaml", "--data", str(data),
                        "--set", "data.train.skip_bad_images=true"], capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("data.train: 3 images, 3 boxes, 1 classes; 1 problem")
    assert str(first) in lines[1]
    val = lines.index(next(ln for ln in lines if ln.startswith("data.val:")))
    assert lines[val].endswith("2 problems")
    assert any(str(data / "val" / "2.jpg") in ln for ln in lines[val + 1:])
    assert any(str(data / "val" / "0.jpg") in ln for ln in lines[val + 1:])
    assert lines[-1] == "3 problems found"


def test_clean_data_passes_and_a_bad_class_count_is_a_config_error(tmp_path, capsys):
    data = coco_folder(tmp_path / "coco")
    code, out, _ = run(["configs/centernet/centernet_r18_coco.yaml", "--data", str(data)], capsys)
    assert code == 0 and out.splitlines()[-1] == "no problems found"
    code, _, err = run(["configs/centernet/centernet_r18_coco.yaml", "--data", str(data), "--set",
                        "model.num_classes=80"], capsys)
    assert code == 2 and "model.num_classes is 80 but the data has 1 classes" in err
