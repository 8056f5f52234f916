"""LWDETRHead on its own: Group DETR isolation, losses on empty / real targets, training lowers the
loss, the sine embedding's layout against a direct formula, and the RF-DETR configs (build, the
shapes one trains 3 iterations)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import detkit
from detkit.models.detr.criterion import SetCriterion
from detkit.models.detr.lw_decoder import box_sine_embedding
from detkit.models.heads.lwdetr_head import LWDETRHead
from detkit.structures import ShapeSpec

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "rfdetr"


def _head(groups=3, queries=10, **kw):
    torch.manual_seed(0)
    criterion = SetCriterion(num_classes=4, class_loss="iabce", alpha=0.25, clamp_boxes=False)
    head = LWDETRHead(input_shapes={"p4": ShapeSpec(32, 16), "p5": ShapeSpec(32, 32)}, num_classes=4,
                      hidden_dim=32, num_queries=queries, num_groups=groups, num_decoder_layers=2,
                      num_heads=4, num_cross_heads=4, ffn_dim=64, criterion=criterion, **kw)
    with torch.no_grad():   # off the init: zero deltas / equal biases would hide wiring mistakes
        g = torch.Generator().manual_seed(1)
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return head


def _features(seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"p4": torch.randn(2, 32, 6, 7, generator=g), "p5": torch.randn(2, 32, 3, 4, generator=g)}


def test_groups_do_not_see_each_other_in_training():
    head = _head().train()
    feats = _features()
    q = head.num_queries
    with torch.no_grad():
        before = head(feats)
        head.query_feat.weight[q:2 * q] += 1.0            # perturb group 1's queries only
        after = head(feats)
    assert before["pred_logits"].shape[1] == 3 * q
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[key][:, :q], before[key][:, :q], atol=0, rtol=0)
        torch.testing.assert_close(after[key][:, 2 * q:], before[key][:, 2 * q:], atol=0, rtol=0)
        assert (after[key][:, q:2 * q] - before[key][:, q:2 * q]).abs().max() > 1e-3
    # at evaluation only group 0 exists: its queries (and outputs) are the training group 0's
    head.eval()
    with torch.no_grad():
        evaluated = head(feats)
    assert evaluated["pred_logits"].shape[1] == q and evaluated["num_groups"] == 1
    torch.testing.assert_close(evaluated["pred_logits"], after["pred_logits"][:, :q], atol=1e-5, rtol=1e-5)


def test_box_sine_embedding_layout():
    boxes = torch.tensor([[0.2, 0.7, 0.1, 0.4]])
    emb = box_sine_embedding(boxes, 8)
    assert emb.shape == (1, 32)
    freqs = 10000 ** (torch.arange(4) * 2 / 8)
    for slot, coord in enumerate([0.7, 0.2, 0.1, 0.4]):   # y first, then x, w, h
        angles = coord * 2 * math.pi / freqs
        expected = torch.stack([angles.sin(), angles.cos()], -1).flatten()
        torch.testing.assert_close(emb[0, slot * 8:(slot + 1) * 8], expected)


def _detkit_targets(n):
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 100.0, 90.0], [5.0, 70.0, 40.0, 92.0]])[:n]
    return {"boxes": boxes, "labels": torch.tensor([0, 2, 3])[:n]}


def test_empty_targets_give_a_finite_loss_with_gradients():
    head = _head().train()
    out = head(_features())
    losses = head.loss(out, [_detkit_targets(0), _detkit_targets(2)], [(96, 112), (80, 100)])
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert head.query_feat.weight.grad is not None and torch.isfinite(head.query_feat.weight.grad).all()
    none = head.loss(head(_features()), [_detkit_targets(0), _detkit_targets(0)], [(96, 112)] * 2)
    assert all(torch.isfinite(v) for v in none.values())
    assert none["loss_bbox"].item() == 0.0 and none["loss_iabce"].item() > 0


def test_a_few_steps_lower_the_loss():
    head = _head().train()
    feats = _features()
    targets = [_detkit_targets(3), _detkit_targets(1)]
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        losses = head.loss(head(feats), targets, [(96, 112)] * 2)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
    assert history[-1] < 0.8 * history[0], history


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="hidden_dim=64"):
        LWDETRHead(input_shapes={"p4": ShapeSpec(32, 16)}, num_classes=2, hidden_dim=64)
    with pytest.raises(ValueError, match="num_levels 2"):
        LWDETRHead(input_shapes={"p4": ShapeSpec(32, 16)}, num_classes=2, hidden_dim=32, num_levels=2)


@pytest.mark.parametrize("name", ["rfdetr_nano_coco", "rfdetr_small_coco", "rfdetr_base_coco"])
def test_coco_configs_build(name):
    cfg = detkit.load_config(CONFIGS / f"{name}.yaml")
    model = detkit.build_model(cfg["model"])
    head = model.head
    assert isinstance(head, LWDETRHead) and head.num_groups == 13 and head.num_queries == 300
    size = cfg["data"]["val"]["pipeline"][-1]["height"]
    assert size % cfg["model"]["size_divisibility"] == 0
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert 25 < params < 36, params   # RF-DETR N / S / B: 30.5 / 32.1 / 29 M (Roboflow's model table)


def test_shapes_config_trains_three_iterations(tmp_path):
    from detkit.data.shapes import generate
    from detkit.data.sources import load_training_config
    from detkit.engine.trainer import train

    root = tmp_path / "shapes"
    generate(root, num_train=8, num_val=4, size=64, seed=0)
    overrides = [f"data.root={root}", "data.train.num_workers=0", "data.val.num_workers=0",
                 "data.train.batch_size=2", "data.val.batch_size=2", "train.max_iters=3",
                 "train.eval_interval=0", "train.log_interval=1", "train.scheduler.warmup_iters=1",
                 "train.checkpoint.interval=3"]
    cfg = load_training_config(CONFIGS / "rfdetr_nano_shapes.yaml", overrides)
    train(cfg, tmp_path / "work")
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    totals = [rec["loss"] for rec in logged if "loss" in rec]
    assert len(totals) == 3 and all(math.isfinite(v) and v > 0 for v in totals), logged
    assert any("bbox/AP" in rec for rec in logged)          # the final evaluation ran


def test_fixed_size_onnx_export_equals_pytorch(tmp_path):
    """ViT + projector + LWDETRHead exported at a fixed size (the ViT's position embeddings are
    traced at that size) and run by onnxruntime; ``dynamic=True`` is one ExportError naming the
    valid sizes, before anything is written."""
    pytest.importorskip("onnxruntime")
    from detkit.deploy.check import sample_images
    from detkit.deploy.export import ExportError, export_onnx
    from detkit.deploy.runtime import DeployedModel

    cfg = detkit.load_config(CONFIGS / "rfdetr_nano_shapes.yaml")["model"]
    cfg["backbone"].update(embed_dim=64, depth=2, num_heads=2, out_indices=[1, 2], window_block_indices=[0])
    cfg["neck"].update(in_features=["stage1", "stage2"], out_channels=32)
    cfg["head"].update(hidden_dim=32, num_queries=30, ffn_dim=64, num_cross_heads=4, num_heads=4,
                       num_top_queries=40, criterion=None)
    torch.manual_seed(0)
    model = detkit.build_model(cfg).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    with pytest.raises(ExportError, match=r"'backbone' \(ViT\).*multiples of 16"):
        export_onnx(model, tmp_path / "dynamic.onnx", 128, 128, dynamic=True)
    assert not (tmp_path / "dynamic.onnx").exists()
    export_onnx(model, tmp_path / "rfdetr.onnx", 128, 128)
    deployed = DeployedModel(tmp_path / "rfdetr.onnx", backend="onnxruntime")
    images = [sample_images(1, 128, 128, seed=s)[0] for s in (3, 4)]
    with torch.no_grad():
        reference = model(images)
    got = deployed(images)
    for g, r in zip(got, reference):
        assert len(g["scores"]) == 40 and torch.equal(g["labels"], r["labels"])
        torch.testing.assert_close(g["scores"], r["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["boxes"], r["boxes"], atol=0.01, rtol=0)
