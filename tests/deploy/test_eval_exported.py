"""``tools/eval.py CONFIG model.onnx`` gives the checkpoint's metrics for an FP32 export (same
loader, evaluator, mapping back), with and without CONFIG (the export's stored config)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

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
                       "onnx-alone": [str(onnx)],
                       "onnx-bf16": [str(ROOT / config), str(onnx), "--amp"]}.items():
        out = tmp_path / f"{name}.json"
        assert main([*args, "--set", *overrides, "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert results["pth"]["bbox/AP50"] > 0          # the model finds objects: a meaningful check
    for name in ("onnx", "onnx-alone"):
        for key, value in results["pth"].items():
            assert results[name][key] == pytest.approx(value, abs=1e-4), (name, key)
    # --amp on an export: OpenVINO in BF16 (chosen for a .onnx too); close to FP32, not exact
    for key in ("bbox/AP", "bbox/AP50"):
        assert results["onnx-bf16"][key] == pytest.approx(results["pth"][key], abs=0.05), key


def test_bf16_runs_on_openvino_and_onnxruntime_refuses_it(confident_model, tmp_path):
    from detkit.deploy.runtime import DeployedModel
    from detkit.inference import Predictor

    pytest.importorskip("openvino")
    model = confident_model("configs/centernet/centernet_r18_shapes.yaml")
    onnx = tmp_path / "model.onnx"
    export_onnx(model, onnx, 96, 96)
    with pytest.raises(ValueError, match="precision 'bf16' needs the openvino backend"):
        DeployedModel(onnx, backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="precision 'bf16' needs the openvino backend"):
        Predictor("configs/centernet/centernet_r18_shapes.yaml", onnx, backend="onnxruntime", amp=True)
    with pytest.raises(ValueError, match="f32 or bf16"):
        DeployedModel(onnx, backend="openvino", precision="fp8")
    config = "configs/centernet/centernet_r18_shapes.yaml"
    # the compiled models run in a child process: holding f32 and bf16 compilations of one file
    # in the suite's process made it crash (SIGSEGV) several tests later
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from detkit.deploy.runtime import DeployedModel
        from detkit.inference import Predictor
        images = torch.rand(1, 3, 96, 96).numpy()
        f32 = DeployedModel({str(onnx)!r}, backend="openvino").runtime
        bf16 = Predictor({config!r}, {str(onnx)!r}, backend="openvino", amp=True).model.runtime
        print(f32.compiled.get_property("INFERENCE_PRECISION_HINT"))
        print(bf16.compiled.get_property("INFERENCE_PRECISION_HINT"))
        print(float(np.abs(f32(images)["scores"] - bf16(images)["scores"]).max()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    hint_f32, hint_bf16, diff = proc.stdout.split("\n")[-4:-1]
    assert "float32" in hint_f32
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:   # elsewhere the plugin falls back to f32
        assert "bfloat16" in hint_bf16
    assert float(diff) < 0.05
