"""The README's onnxruntime + numpy example ("Export and deploy") runs as printed and its
detections equal ``Predictor``'s on the checkpoint (with the config's Letterbox test pipeline)."""

import contextlib
import io
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit import Predictor
from detkit.config import dump_config, load_config
from detkit.data.shapes import render_image
from detkit.deploy.export import export_onnx

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")
CONFIG = "configs/centernet/centernet_r18_shapes.yaml"
NAMES = ["circle", "square", "triangle", "star"]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Export and deploy"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _printed(code: str) -> list[tuple[str, float, np.ndarray]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    rows = [line.split() for line in out.getvalue().splitlines()]
    return [(r[0], float(r[1]), np.array(r[2:], float)) for r in rows]


def test_readme_onnxruntime_example_equals_the_predictor(confident_model, tmp_path, monkeypatch):
    code = _readme_example()
    assert "import onnxruntime" in code and "torch" not in code and "detkit" not in code
    assert "SIZE, PAD = 512, 0" in code
    model = confident_model(CONFIG)
    export_onnx(model, tmp_path / "model.onnx", 128, 128, dynamic=True, class_names=NAMES)
    cfg = load_config(ROOT / CONFIG)
    cfg["data"]["root"] = str(tmp_path / "no_data")
    cfg["data"]["val"]["pipeline"] = [{"type": "Letterbox", "size": 512, "pad_value": 0}]
    dump_config(cfg, tmp_path / "cfg.yaml")
    torch.save({"model": model.state_dict(), "meta": {"class_names": NAMES}}, tmp_path / "m.pth")
    photo = render_image(0, "val", 2, 256)[0][:200]                   # 200 x 256: letterboxed
    cv2.imwrite(str(tmp_path / "photo.jpg"), photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    monkeypatch.chdir(tmp_path)
    printed = _printed(code)
    reference = Predictor(tmp_path / "cfg.yaml", tmp_path / "m.pth", score_thr=0.0)(
        cv2.imread(str(tmp_path / "photo.jpg"))[..., ::-1].copy())
    assert len(printed) == len(reference["scores"]) > 10
    unused = list(range(len(printed)))
    for name, score, box in zip(reference["label_names"], reference["scores"].tolist(),
                                reference["boxes"].numpy()):
        # printed: score to 4 decimals, box to 0.1 px
        match = next((i for i in unused if printed[i][0] == name and abs(printed[i][1] - score) < 2e-4
                      and np.abs(printed[i][2] - box).max() < 0.1), None)
        assert match is not None, f"Predictor's {name} {score:.4f} {box} is not printed"
        unused.remove(match)
    # the boxes are in the 200 x 256 photo's pixels (letterbox undone), some at its edges
    boxes = np.stack([p[2] for p in printed])
    assert boxes[:, 3].max() <= 200 and boxes[:, 2].max() <= 256 and (boxes[:, 3] > 150).any()
