"""Pre-training on the engine: every method trains, exact resume, the CLI, metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ssl_helpers import TINY_DARKNET, make_folder, pretrain_config

from detkit.engine import load_checkpoint
from detkit.ssl import pretrain

REPO = Path(__file__).resolve().parents[2]
METHODS = {
    "MoCoV2": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 12, "bn_splits": 2, "momentum": 0.9},
    "SimCLR": {"proj_hidden_dim": 32, "proj_dim": 16},
    "BYOL": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "SimSiam": {"proj_dim": 32, "pred_hidden_dim": 8},
    "DINO": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "warmup_teacher_temp": 0.02},
}


def config(root, name, **kw):
    return pretrain_config(root, {"type": name, "backbone": dict(TINY_DARKNET), **METHODS[name]},
                           local=2 if name == "DINO" else 0, **kw)


@pytest.mark.parametrize("name", ["MoCoV2", "DINO"])
def test_exact_resume_of_a_pretraining_run(tmp_path, name):
    root = make_folder(tmp_path / "images")
    cfg = config(root, name)
    if name == "DINO":   # the ViT recipe's optimizer: AdamW, weight decay 0.04 -> 0.4 (cosine)
        cfg["train"]["optimizer"] = {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.04}
        cfg["train"]["scheduler"]["weight_decay_end"] = 0.4
    pretrain(cfg, tmp_path / "straight")
    pretrain(cfg, tmp_path / "split", stop_after=2)
    half = load_checkpoint(tmp_path / "split" / "last.pth")
    assert half["iter"] == 2
    pretrain(cfg, tmp_path / "split", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pth")
    b = load_checkpoint(tmp_path / "split" / "last.pth")
    assert a["iter"] == b["iter"] == 4
    for key, value in a["model"].items():   # momentum encoder, queue, centre, progress included
        assert torch.equal(value, b["model"][key]), key
    moved = [k for k, v in a["model"].items()
             if v.is_floating_point() and not torch.equal(v, half["model"][k])]
    assert any(k.startswith(("encoder_k.", "teacher.")) for k in moved)   # momentum updates happened
    assert a["meta"]["ssl"]["backbone_type"] == "Darknet53"


@pytest.mark.parametrize("name", ["SimCLR", "BYOL", "SimSiam"])
def test_other_methods_train_and_log_feature_std(tmp_path, name):
    root = make_folder(tmp_path / "images")
    pretrain(config(root, name, iters=2), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2]
    loss_keys = [k for k in records[0] if k.startswith("loss_")]
    assert len(loss_keys) == 1 and records[0]["loss"] == pytest.approx(records[0][loss_keys[0]])
    assert 0.0 < records[-1]["feature_std"] < 2.0


@pytest.mark.slow
def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path):
    cfg = REPO / "configs/pretrain/byol_r18_shapes.yaml"
    make_folder(tmp_path / "data/train", count=2)   # the config's img_dir; no generated shapes needed
    proc = subprocess.run([sys.executable, str(REPO / "tools/pretrain.py"), str(cfg), "--work-dir",
                           str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'data'}",
                           "data.train.batch_size=2", "model.base_momentun=0.9"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.base_momentun" in proc.stderr and "did you mean 'base_momentum'" in proc.stderr


@pytest.mark.parametrize("path", sorted((REPO / "configs/pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_pretrain_config_builds(path):
    from detkit.config import load_config
    from detkit.engine.optim import build_optimizer
    from detkit.engine.setup import train_settings
    from detkit.ssl import build_method, build_views
    from detkit.ssl.regions import ProposalCrops

    cfg = load_config(path)
    train_settings(cfg)
    method = build_method(cfg["model"])
    assert method.backbone_type in ("ResNet", "Darknet53", "ViT")
    views = build_views(cfg["data"]["train"]["dataset"]["views"])
    assert views.num_global >= 2
    build_optimizer(method, cfg["train"]["optimizer"])            # LARS for SimCLR / BYOL
    crops = cfg["data"]["train"]["dataset"].get("proposal_crops")
    if crops is not None:
        ProposalCrops(**crops)


@pytest.mark.slow
def test_cli_names_an_unreadable_image_with_exit_code_2(tmp_path):
    from detkit.config import dump_config

    root = make_folder(tmp_path / "images", count=2)
    (root / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 64)      # truncated JPEG
    cfg = config(root, "SimCLR", iters=1, batch=3)
    cfg["data"]["train"]["num_workers"] = 1                             # raised in a worker process
    dump_config(cfg, tmp_path / "cfg.yaml")
    proc = subprocess.run([sys.executable, str(REPO / "tools/pretrain.py"), str(tmp_path / "cfg.yaml"),
                           "--work-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "\nerror: truncated JPEG file (no end-of-image marker): " in proc.stderr
    assert proc.stderr.rstrip().endswith("cut.jpg")


def test_too_few_global_views_is_a_clear_error():
    from detkit.ssl import build_method

    method = build_method({"type": "BYOL", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 8,
                           "pred_hidden_dim": 8})
    one_view = [torch.rand(1, 3, 32, 32) for _ in range(2)]
    local = [{"local_views": torch.rand(2, 3, 16, 16)} for _ in range(2)]
    with pytest.raises(ValueError, match="BYOL: needs 2 or more global views"):
        method(one_view, local)
    dino = build_method({"type": "DINO", "backbone": dict(TINY_DARKNET), "hidden_dim": 8, "out_dim": 16})
    assert "loss_dino" in dino(one_view, local)          # one global view + local views is enough
