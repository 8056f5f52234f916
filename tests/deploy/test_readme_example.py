"""The README's onnxruntime + numpy example ("Export and deploy") runs as printed."""

import contextlib
import io
import re
from pathlib import Path

import cv2
import pytest

from detkit.data.shapes import render_image
from detkit.deploy.export import export_onnx

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Export and deploy"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_onnxruntime_example_runs(confident_model, tmp_path, monkeypatch):
    code = _readme_example()
    assert "import onnxruntime" in code and "torch" not in code and "detkit" not in code
    model = confident_model("configs/centernet/centernet_r18_shapes.yaml")
    export_onnx(model, tmp_path / "model.onnx", 128, 128, dynamic=True,
                class_names=["circle", "square", "triangle", "star"])
    cv2.imwrite(str(tmp_path / "photo.jpg"), render_image(0, "val", 2, 256)[0][:200, :, ::-1])
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 100 and lines[0].split()[0] in {"circle", "square", "triangle", "star"}
