"""A checkpoint of another model (issue 29, finding 6): ``train.load_from`` warns when under half
of the model's tensors match and is one error (exit 2) when none do; Predictor / tools/eval.py
refuse it in one line naming both architectures and the counts, not a wall of key names.

The checkpoints are built, not trained: a YOLOv1 model (same Darknet53-tiny backbone as the
YOLOv3-tiny config, so 126 of 270 tensors fit) and a CenterNet R18 (nothing fits), each with the
config the trainer stores."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from detkit.config import dump_config, load_config
from detkit.engine import CheckpointError, Trainer, load_model_weights
from detkit.engine.architecture import describe_checkpoint, describe_model
from detkit.inference import Predictor
from detkit.models import build_model

from engine_helpers import REPO, SMALLEST_REAL_CONFIG, base_config

YOLOV3 = "OneStageDetector (Darknet53, YOLOv3Neck, YOLOHead)"
YOLOV1 = "OneStageDetector (Darknet53, YOLOv1Head)"
CENTERNET = "OneStageDetector (ResNet-18, CenterNetUpsample, CenterNetHead)"


def _checkpoint_of(config: str, path):
    cfg = load_config(REPO / config)
    cfg["model"]["backbone"]["weights"] = None
    cfg["model"]["num_classes"] = 4
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    torch.save({"model": model.state_dict(), "iter": 1, "config": dump_config(cfg)}, path)
    return model


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    _checkpoint_of("configs/yolov1/yolov1_d53tiny_shapes.yaml", folder / "yolov1.pth")
    _checkpoint_of("configs/centernet/centernet_r18_shapes.yaml", folder / "centernet.pth")
    return folder


def _train_tool():
    spec = importlib.util.spec_from_file_location("detkit_train_cli_foreign", REPO / "tools/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_names_agree_between_model_and_stored_config(foreign):
    assert describe_checkpoint(torch.load(foreign / "yolov1.pth", weights_only=True)) == YOLOV1
    assert describe_checkpoint(torch.load(foreign / "centernet.pth", weights_only=True)) == CENTERNET
    cfg = load_config(SMALLEST_REAL_CONFIG)
    cfg["model"]["num_classes"] = 4
    assert describe_model(build_model(cfg["model"])) == YOLOV3
    assert describe_checkpoint({"model": {}}) is None and describe_checkpoint({"config": ": ["}) is None


def test_load_from_under_half_matched_warns_once(shapes_root, foreign, tmp_path, capsys):
    cfg = base_config(shapes_root, iters=1, load_from=str(foreign / "yolov1.pth"))
    trainer = Trainer(cfg, tmp_path)
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "load_from" in line]
    assert len(warning) == 1, out          # one line, not the lists of missing / ignored keys
    assert warning[0].startswith("WARNING: load_from ")
    assert "only 126 / 270 model tensors matched" in warning[0]
    assert YOLOV1 in warning[0] and YOLOV3 in warning[0]
    source = torch.load(foreign / "yolov1.pth", weights_only=True)["model"]
    own = trainer.model.state_dict()
    shared = [k for k in source if k in own and own[k].shape == source[k].shape]
    assert len(shared) == 126 and all(torch.equal(own[k], source[k]) for k in shared)


def test_load_from_nothing_matched_is_one_error_exit_2(shapes_root, foreign, tmp_path, capsys):
    cfg = base_config(shapes_root, iters=1, load_from=str(foreign / "centernet.pth"))
    with pytest.raises(CheckpointError) as error:
        Trainer(cfg, tmp_path / "api")
    message = str(error.value)
    assert "\n" not in message and "none of the model's 270 tensors match" in message
    assert CENTERNET in message and YOLOV3 in message
    capsys.readouterr()
    code = _train_tool().main([str(SMALLEST_REAL_CONFIG), "--work-dir", str(tmp_path / "cli"),
                               "--set", f"data.root={shapes_root}", "train.max_iters=1",
                               f"train.load_from={foreign / 'centernet.pth'}", "--no-plots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: train.load_from: ") and CENTERNET in err[-1]
    assert not (tmp_path / "cli" / "last.pth").exists()


def test_predictor_and_eval_name_both_architectures_in_one_line(shapes_root, foreign, tmp_path):
    cfg = load_config(SMALLEST_REAL_CONFIG)
    cfg["data"]["root"] = str(shapes_root)
    for name, arch in (("yolov1", YOLOV1), ("centernet", CENTERNET)):
        with pytest.raises(CheckpointError) as error:
            Predictor(cfg, foreign / f"{name}.pth")
        message = str(error.value)
        assert "\n" not in message and arch in message and YOLOV3 in message, message
    assert "144 of the model's 270 tensors do not match" in _predictor_error(cfg, foreign / "yolov1.pth")
    spec = importlib.util.spec_from_file_location("detkit_eval_cli_foreign", REPO / "tools/eval.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = tmp_path / "yolov3.yaml"
    dump_config(cfg, config)
    with pytest.raises(CheckpointError, match=r"^[^\n]*YOLOv1Head\),[^\n]*YOLOHead\)[^\n]*$"):
        tool.evaluate_model(tool.parse_args([str(config), str(foreign / "yolov1.pth"), "--device", "cpu"]))


def _predictor_error(cfg, path) -> str:
    with pytest.raises(CheckpointError) as error:
        Predictor(cfg, path)
    return str(error.value)


def test_same_model_other_class_count_keeps_the_shape_listing():
    """The detailed report stays for weights of the same model that nearly fit."""
    cfg = load_config(SMALLEST_REAL_CONFIG)
    cfg["model"]["num_classes"] = 4
    model = build_model(cfg["model"])
    cfg["model"]["num_classes"] = 7
    state = build_model(cfg["model"]).state_dict()
    with pytest.raises(CheckpointError, match=r"shape mismatch .*\n.*\[.*\] vs model"):
        load_model_weights(model, state, source="seven.pth", architecture=describe_model(model))
