"""SemanticHead / DeepLabV3Head / Segmentor on tiny CPU inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detkit.config import load_config
from detkit.models import build_model
from detkit.models.detectors.segmentor import logits_to_original
from detkit.models.heads.seg_head import DeepLabV3Head, SemanticHead
from detkit.registry import ConfigError
from detkit.structures import ShapeSpec

FPN_SHAPES = {f"p{i}": ShapeSpec(16, 2 ** i) for i in range(2, 6)}
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "segmentation"


def fpn_features(b=2, h=64, w=96):
    torch.manual_seed(0)
    return {f"p{i}": torch.randn(b, 16, h // 2 ** i, w // 2 ** i) for i in range(2, 6)}


def test_semantic_head_shapes_and_structure():
    head = SemanticHead(input_shapes=FPN_SHAPES, num_classes=5, channels=8, norm="GN")
    logits = head(fpn_features())
    assert logits.shape == (2, 5, 16, 24) and head.output_stride == 4
    # Panoptic FPN: p2 one conv, p3 one conv+up, p4 two, p5 three
    n_convs = [sum(isinstance(m, torch.nn.Conv2d) for m in br.modules()) for br in head.branches]
    assert n_convs == [1, 1, 2, 3]
    preds = head.predict(logits, [(64, 96), (50, 70)])
    assert preds[0]["sem_seg"].shape == (64, 96) and preds[1]["sem_seg"].shape == (50, 70)
    assert preds[1]["sem_seg"].dtype == torch.int64


def test_loss_equals_cross_entropy_over_labelled_unpadded_pixels():
    head = SemanticHead(input_shapes=FPN_SHAPES, num_classes=5, channels=8)
    logits = head(fpn_features())
    sizes = [(64, 96), (50, 70)]
    g = torch.Generator().manual_seed(1)
    targets = []
    for h, w in sizes:
        m = torch.randint(0, 5, (h, w), generator=g)
        m[torch.rand(h, w, generator=g) < 0.3] = 255
        targets.append({"sem_seg": m, "image_id": len(targets)})
    loss = head.loss(logits, targets, sizes)["loss_sem_seg"]
    up = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
    per_pixel = [F.cross_entropy(up[i:i + 1, :, :h, :w], t["sem_seg"][None], ignore_index=255,
                                 reduction="none") for i, ((h, w), t) in enumerate(zip(sizes, targets))]
    valid = [(t["sem_seg"] != 255) for t in targets]
    ref = sum(p[0][v].sum() for p, v in zip(per_pixel, valid)) / sum(v.sum() for v in valid)
    assert torch.allclose(loss, ref, atol=1e-6)


def test_all_ignored_gives_zero_finite_loss_and_errors():
    head = SemanticHead(input_shapes=FPN_SHAPES, num_classes=3, channels=8)
    logits = head(fpn_features(b=1))
    loss = head.loss(logits, [{"sem_seg": torch.full((64, 96), 255)}], [(64, 96)])["loss_sem_seg"]
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="needs 'sem_seg'"):
        head.loss(logits, [{"image_id": 7}], [(64, 96)])
    with pytest.raises(ValueError, match="sem_seg is"):
        head.loss(logits, [{"sem_seg": torch.zeros(10, 10, dtype=torch.long)}], [(64, 96)])
    with pytest.raises(ValueError, match="not all in the neck"):
        SemanticHead(input_shapes=FPN_SHAPES, num_classes=3, in_features=["p2", "p9"])


def test_deeplabv3_head_rates_and_shapes():
    shapes = {"c5": ShapeSpec(32, 8)}
    head = DeepLabV3Head(input_shapes=shapes, num_classes=4, channels=16)
    dilations = [b.conv.dilation[0] for b in head.aspp.branches[1:]]
    assert dilations == [12, 24, 36]  # output stride 8 doubles the stride-16 rates
    head16 = DeepLabV3Head(input_shapes={"c5": ShapeSpec(32, 16)}, num_classes=4, channels=16)
    assert [b.conv.dilation[0] for b in head16.aspp.branches[1:]] == [6, 12, 18]
    x = {"c5": torch.randn(2, 32, 8, 12)}
    logits = head(x)
    assert logits.shape == (2, 4, 8, 12)
    out = head.predict(logits, [(64, 96), (60, 90)])
    assert out[1]["sem_seg"].shape == (60, 90)


def tiny_segmentor(head="SemanticHead"):
    if head == "SemanticHead":
        cfg = {"type": "Segmentor", "num_classes": 3,
               "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c2", "c3", "c4", "c5"]},
               "neck": {"type": "FPN", "out_channels": 16}, "head": {"type": "SemanticHead", "channels": 8}}
    else:
        cfg = {"type": "Segmentor", "num_classes": 3,
               "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c5"], "output_stride": 8},
               "head": {"type": "DeepLabV3Head", "channels": 16, "norm": "GN"}}
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("head", ["SemanticHead", "DeepLabV3Head"])
def test_segmentor_train_and_eval_outputs(head):
    model = tiny_segmentor(head)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 56)]
    targets = [{"sem_seg": torch.randint(0, 3, (64, 64)), "boxes": torch.zeros(0, 4)},
               {"sem_seg": torch.randint(0, 3, (48, 56)), "boxes": torch.zeros(0, 4)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    model.eval()
    with torch.no_grad():
        plain = model(images)
        metas = [{"orig_size": torch.tensor([32, 30]), "scale": torch.tensor([2.0, 2.0]),
                  "offset": torch.tensor([2.0, 0.0])}, {"orig_size": torch.tensor([48, 56])}]
        mapped = model(images, metas)
    assert plain[0]["sem_seg"].shape == (64, 64) and plain[1]["sem_seg"].shape == (48, 56)
    assert mapped[0]["sem_seg"].shape == (32, 30) and mapped[1]["sem_seg"].shape == (48, 56)
    assert torch.equal(mapped[1]["sem_seg"], plain[1]["sem_seg"])
    assert mapped[0]["boxes"].shape == (0, 4) and mapped[0]["labels"].dtype == torch.int64


def test_logits_to_original_crops_letterbox_then_resizes():
    logits = torch.randn(3, 20, 24)
    meta = {"orig_size": torch.tensor([8, 10]), "scale": torch.tensor([2.0, 2.0]),
            "offset": torch.tensor([2.0, 1.0])}
    ref = F.interpolate(logits[None, :, 1:17, 2:22], size=(8, 10), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(logits_to_original(logits, meta), ref)
    assert logits_to_original(logits, {}) is logits


def test_a_few_steps_lower_the_loss():
    model = tiny_segmentor()
    torch.manual_seed(1)
    images = [torch.rand(3, 32, 32) for _ in range(2)]
    for im in images:
        im[:, 8:24, 8:24] = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[8:24, 8:24] = 1
    targets = [{"sem_seg": mask, "boxes": torch.zeros(0, 4)} for _ in images]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        loss = model(images, targets)["loss_sem_seg"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ["seg_r18_shapes", "deeplabv3_r50_d8_voc", "fpn_seg_r50_coco"])
def test_configs_build(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["model.backbone.weights=null"])
    assert cfg["evaluation"]["type"] == "SegEvaluator"
    model = build_model(cfg["model"])
    assert model.head.num_classes == cfg["model"]["num_classes"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="missing 'head'"):
        build_model({"type": "Segmentor", "num_classes": 3, "backbone": {"type": "ResNet", "depth": 18}})
    with pytest.raises(ConfigError, match="model.head"):
        build_model({"type": "Segmentor", "num_classes": 3, "backbone": {"type": "ResNet", "depth": 18},
                     "head": {"type": "SemanticHead", "chanels": 8}})
