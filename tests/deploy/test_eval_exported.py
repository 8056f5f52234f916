"""``tools/eval.py CONFIG model.onnx`` gives the checkpoint's metrics for an FP32 export (same
loader, evaluator, mapping back), with and without CONFIG (the export's stored config)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from detkit.config import load_config
from detkit.data.shapes import generate
from detkit.deploy.export import export_onnx

from .conftest import ROOT

pytest.importorskip("onnxruntime")


def _eval_main():
    spec = importlib.util.spec_from_file_location("detkit_tools_eval_exported", ROOT / "tools" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_eval_of_an_export_equals_eval_of_the_checkpoint(confident_model, tmp_path):
    import yaml

    config = "configs/centernet/centernet_r18_shapes.yaml"
    data = tmp_path / "shapes"
    generate(data, num_train=2, num_val=6, size=96, seed=3)
    overrides = [f"data.root={data}", "data.val.num_workers=0", "data.val.batch_size=4"]
    cfg = load_config(ROOT / config, overrides)
    model = confident_model(config)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    onnx = tmp_path / "model.onnx"
    export_onnx(model, onnx, 96, 96, dynamic=True, config_text=yaml.safe_dump(cfg))
    main = _eval_main()
    results = {}
    for name, args in {"pth": [str(ROOT / config), str(ckpt)],
                       "onnx": [str(ROOT / config), str(onnx)],
                       "onnx-alone": [str(onnx)]}.items():
        out = tmp_path / f"{name}.json"
        assert main([*args, "--set", *overrides, "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert results["pth"]["bbox/AP50"] > 0          # the model finds objects: a meaningful check
    for name in ("onnx", "onnx-alone"):
        for key, value in results["pth"].items():
            assert results[name][key] == pytest.approx(value, abs=1e-4), (name, key)
