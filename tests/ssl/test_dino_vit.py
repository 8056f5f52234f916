"""DINO pre-training of detkit's ViT: the CLS token after the final norm is the pooled representation
(against transformers' ``Dinov2Model.pooler_output`` on random weights), global and local views of
two sizes through one ViT (interpolated position embeddings), the teacher on the global views only,
view sizes the patch grid must divide, exact resume, and ``model.backbone.weights`` loading the
pre-trained teacher backbone into a fresh ViT (also the shipped configs/pretrain/dino_vit_shapes.yaml).
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ssl_helpers import make_folder, pretrain_config

from detkit.engine import load_checkpoint
from detkit.registry import BACKBONES
from detkit.ssl import build_method, pretrain

REPO = Path(__file__).resolve().parents[2]
B = 3   # an odd batch: chunking into views must not mix images
TINY_VIT = {"type": "ViT", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "out_indices": [1],
            "pretrain_image_size": 32, "layer_scale_init": 0.5}
HEAD = {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 24, "student_temp": 0.1, "teacher_temp": 0.04}


def _dino(backbone: dict | None = None, **kw):
    torch.manual_seed(0)
    return build_method({"type": "DINO", "backbone": dict(backbone or TINY_VIT), **HEAD, **kw})


def _views(count: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, size, size, generator=g) for _ in range(count)]


def _patch_calls(encoder) -> list[tuple]:
    """Input shapes of every pass of ``encoder``'s ViT (its patch embedding runs once per pass)."""
    calls: list[tuple] = []
    encoder.backbone.patch_embed.register_forward_hook(
        lambda m, args, out: calls.append(tuple(args[0].shape)))
    return calls


def test_dino_pools_the_cls_token_after_the_final_norm_as_dinov2(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                    patch_size=8, layerscale_value=0.5)
    model = transformers.Dinov2Model(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                  # random everywhere (transformers zeroes biases)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(tmp_path)
    method = _dino(dict(TINY_VIT, weights=str(tmp_path))).eval()
    for size in (32, 16, 24):              # the embeddings' own 4x4 grid, then interpolated to 2x2, 3x3
        x = torch.randn(2, 3, size, size, generator=g)
        with torch.no_grad():
            ref = model(x)
            ours = method.student.features(x)
        assert torch.allclose(ours, ref.pooler_output, atol=1e-5), size
        # not the average of the patch tokens (what a CNN backbone's pooling would give)
        assert not torch.allclose(ours, ref.last_hidden_state[:, 1:].mean(1), atol=1e-2)
    images = torch.rand(2, 3, 32, 32, generator=g)   # embed(): [0,1] images, normalised as in training
    with torch.no_grad():
        ref = model(method._normalise(images)).pooler_output
    assert torch.allclose(method.embed(images), ref, atol=1e-5)


def test_teacher_sees_the_globals_student_every_view_of_two_sizes():
    method = _dino()
    with torch.no_grad():                  # a teacher that differs from the student
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        method.center.normal_()
    student_calls, teacher_calls = _patch_calls(method.student), _patch_calls(method.teacher)
    globals_, locals_ = _views(2, 32, seed=5), _views(3, 16, seed=6)
    center = method.center.clone()
    loss = method.compute(globals_, locals_)["loss_dino"]
    assert teacher_calls == [(2 * B, 3, 32, 32)]
    assert student_calls == [(2 * B, 3, 32, 32), (3 * B, 3, 16, 16)]
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.student.backbone.pos_embed.grad.abs().sum() > 0   # the interpolated embeddings learn

    with torch.no_grad():                  # the objective pair by pair, views one at a time
        s = [method.student(v) for v in globals_ + locals_]
        t = [method.teacher(v) for v in globals_]
    total, pairs = 0.0, 0
    for i in range(2):
        target = F.softmax((t[i] - center) / 0.04, dim=1)
        for v in range(5):
            if v != i:
                total += float((-(target * F.log_softmax(s[v] / 0.1, dim=1)).sum(1)).mean())
                pairs += 1
    assert loss.item() == pytest.approx(total / pairs, rel=1e-5)


def test_view_sizes_the_patches_or_windows_do_not_divide_are_a_clear_error():
    with pytest.raises(ValueError, match=r"views of size \[\(30, 30\)\].*multiple of 8"):
        _dino().compute(_views(2, 32, seed=1), _views(2, 30, seed=2))
    windowed = _dino(dict(TINY_VIT, windows_per_side=2, window_block_indices=[0]))
    with pytest.raises(ValueError, match=r"views of size \[\(24, 24\)\].*multiple of 16"):
        windowed.compute(_views(2, 32, seed=1), _views(2, 24, seed=2))
    assert windowed.compute(_views(2, 32, seed=1), _views(2, 16, seed=2))["loss_dino"].isfinite()


def _assert_loads_teacher(checkpoint: Path, node: dict) -> None:
    """A fresh ViT built with ``weights=checkpoint`` holds exactly the pre-trained teacher backbone."""
    ckpt = load_checkpoint(checkpoint)
    teacher = {k[len("teacher.backbone."):]: v for k, v in ckpt["model"].items()
               if k.startswith("teacher.backbone.")}
    fresh = BACKBONES.build(dict(node, weights=None), "model.backbone").state_dict()
    vit = BACKBONES.build(dict(node, weights=str(checkpoint)), "model.backbone").state_dict()
    assert set(vit) == set(teacher) and len(vit) > 10
    for key, value in vit.items():
        assert torch.equal(value, teacher[key]), key
    assert any(not torch.equal(fresh[k], teacher[k]) for k in fresh)   # not the initialisation
    assert ckpt["meta"]["ssl"]["backbone_type"] == "ViT"


def test_vit_pretraining_resumes_exactly_and_fine_tunes_from_the_teacher(tmp_path):
    root = make_folder(tmp_path / "images")
    cfg = pretrain_config(root, {"type": "DINO", "backbone": dict(TINY_VIT), **HEAD,
                                 "warmup_teacher_temp": 0.02}, local=2)
    cfg["train"]["optimizer"] = {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.04}
    cfg["train"]["scheduler"]["weight_decay_end"] = 0.4
    pretrain(cfg, tmp_path / "straight")
    pretrain(cfg, tmp_path / "split", stop_after=2)
    half = load_checkpoint(tmp_path / "split" / "last.pth")
    assert half["iter"] == 2
    pretrain(cfg, tmp_path / "split", resume=True)
    a, b = (load_checkpoint(tmp_path / run / "last.pth") for run in ("straight", "split"))
    assert a["iter"] == b["iter"] == 4
    for key, value in a["model"].items():   # teacher, centre, progress included
        assert torch.equal(value, b["model"][key]), key
    moved = [k for k, v in a["model"].items()
             if v.is_floating_point() and not torch.equal(v, half["model"][k])]
    assert any(k.startswith("teacher.backbone.") for k in moved) and "center" in moved
    # fine-tuning: the same ViT with other outputs and windows (no parameters) loads the teacher
    _assert_loads_teacher(tmp_path / "straight" / "last.pth", TINY_VIT)
    _assert_loads_teacher(tmp_path / "straight" / "last.pth",
                          dict(TINY_VIT, out_indices=[1, 2], windows_per_side=2, window_block_indices=[0]))


def test_shipped_vit_config_pretrains_and_its_checkpoint_loads_into_the_vit(tmp_path, shapes_root):
    from detkit.config import load_config

    cfg = load_config(REPO / "configs/pretrain/dino_vit_shapes.yaml",
                      [f"data.root={shapes_root}", "data.train.batch_size=2", "data.train.num_workers=0",
                       "train.max_iters=2", "train.log_interval=1"])
    pretrain(cfg, tmp_path / "run")
    _assert_loads_teacher(tmp_path / "run" / "last.pth", cfg["model"]["backbone"])
