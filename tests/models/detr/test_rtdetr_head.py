"""RTDETRHead / DFINEHead as detkit heads: predict (against transformers' post-processing),
targets conversion and the criterion call, empty images, the exportable sampler, gradients."""

from types import SimpleNamespace

import pytest
import torch
from transformers import RTDetrImageProcessor

from detkit.errors import DetkitError
from detkit.models import HEADS
from detkit.registry import ConfigError
from detkit.structures import ShapeSpec

SHAPES = {"p3": ShapeSpec(24, 8), "p4": ShapeSpec(24, 16), "p5": ShapeSpec(24, 32)}
SMALL = dict(hidden_dim=32, num_queries=12, num_decoder_layers=2, num_heads=4, ffn_dim=48, num_denoising=10,
             num_top_queries=12)


def _head(kind="RTDETRHead", **kw):
    torch.manual_seed(0)
    head = HEADS.build({"type": kind, **SMALL, **kw}, "model.head", input_shapes=SHAPES, num_classes=3)
    with torch.no_grad():   # leave the zero-initialised branches (box deltas, gates) non-trivial
        for p in head.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return head


def _features(batch=2, h=96, w=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, 24, h // s.stride, w // s.stride, generator=g)
            for name, s in SHAPES.items()}


def test_predict_equals_transformers_post_processing_and_clips_per_image():
    head = _head().eval()
    with torch.no_grad():
        out = head(_features())
    assert out["image_size"] == (96, 160)
    sizes = [(70, 150), (96, 160)]
    ours = head.predict(out, sizes)
    ref = RTDetrImageProcessor().post_process_object_detection(
        SimpleNamespace(logits=out["pred_logits"], pred_boxes=out["pred_boxes"]), threshold=-1.0,
        target_sizes=[(96, 160)] * 2)
    for (h, w), o, r in zip(sizes, ours, ref):
        assert torch.allclose(o["scores"], r["scores"]) and torch.equal(o["labels"], r["labels"])
        clipped = torch.minimum(r["boxes"].clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        assert torch.allclose(o["boxes"], clipped, atol=1e-4)
        assert o["boxes"][:, 2].max() <= w and o["boxes"][:, 3].max() <= h
    assert (ours[0]["boxes"] != ref[0]["boxes"]).any()      # the smaller image really was clipped


class _RecordingCriterion(torch.nn.Module):
    def forward(self, outputs, targets):
        self.seen = targets
        return {"loss_total": outputs["pred_logits"].sum() * 0 + 1.0}


@pytest.mark.parametrize("kind", ["RTDETRHead", "DFINEHead"])
def test_training_with_empty_and_mixed_images(kind):
    criterion = _RecordingCriterion()
    head = _head(kind, criterion=criterion).train()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = head(_features(), empty)
    assert "dn_outputs" not in out and len(out["aux_outputs"]) == 1
    assert all(torch.isfinite(v).all() for v in (out["pred_logits"], out["pred_boxes"]))
    mixed = [empty[0], {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}]
    out = head(_features(), mixed)
    assert out["dn_meta"]["dn_num_split"] == [20, 12] and len(out["dn_outputs"]) == 2
    assert out["dn_outputs"][0]["pred_logits"].shape == (2, 20, 3)
    if kind == "DFINEHead":
        assert out["dn_pre_outputs"]["pred_boxes"].shape == (2, 20, 4)
        assert out["pred_corners"].shape == (2, 12, 4 * 33)
    # loss: detkit targets (xyxy pixels of the padded 96x160 batch) reach the criterion in DETR format
    detkit_targets = [{"boxes": torch.tensor([[16.0, 24.0, 48.0, 72.0], [0.0, 0.0, 10.0, 10.0]]),
                       "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([0, 1])},
                      {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = head.loss(out, detkit_targets, [(96, 160), (80, 120)])
    assert set(losses) == {"loss_total"}
    seen = criterion.seen
    assert torch.allclose(seen[0]["boxes"], torch.tensor([[32 / 160, 48 / 96, 32 / 160, 48 / 96]]))
    assert seen[0]["labels"].tolist() == [1] and seen[1]["boxes"].shape == (0, 4)


def test_loss_without_criterion_is_a_clear_error():
    head = _head().train()
    out = head(_features())
    with pytest.raises(DetkitError, match="without a criterion"):
        head.loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2, [])


@pytest.mark.parametrize("kind,kw", [("RTDETRHead", {"num_levels": 4, "num_points": [2, 3, 1, 2]}),
                                     ("DFINEHead", {"reg_max": 8})])
def test_exportable_sampler_gives_the_same_outputs(kind, kw):
    head = _head(kind, **kw).eval()
    g = torch.Generator().manual_seed(3)
    features = {name: torch.randn(2, 24, h, w, generator=g)        # levels of odd sizes
                for name, (h, w) in zip(SHAPES, [(13, 17), (7, 9), (3, 5)])}
    with torch.no_grad():
        ref = head(features)
        head.set_exportable(True)
        out = head(features)
    for key in ("pred_logits", "pred_boxes"):
        assert (out[key] - ref[key]).abs().max() < 1e-5
        assert (out["aux_outputs"][0][key] - ref["aux_outputs"][0][key]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["RTDETRHead", "DFINEHead"])
def test_last_boxes_train_the_first_box_head(kind):
    """As in the RT-DETR / D-FINE releases: a later layer's boxes are built on the earlier
    layers' undetached boxes (RT-DETR) or corner logits (D-FINE), so their loss reaches them."""
    head = _head(kind).train()
    out = head(_features())
    out["pred_boxes"].sum().backward()
    first_box_head = head.decoder.box_heads[0].layers[-1].weight
    assert first_box_head.grad is not None and first_box_head.grad.abs().sum() > 0


def test_config_typos_and_bad_features_are_errors():
    with pytest.raises(ConfigError, match="num_queries"):
        HEADS.build({"type": "RTDETRHead", "num_querys": 5}, "model.head", input_shapes=SHAPES, num_classes=3)
    with pytest.raises(ConfigError, match="p6"):
        HEADS.build({"type": "DFINEHead", "in_features": ["p4", "p6"]}, "model.head", input_shapes=SHAPES,
                    num_classes=3)


@pytest.mark.parametrize("kind", ["RTDETRHead", "DFINEHead"])
def test_maps_with_fewer_positions_than_queries(kind):
    """A 64x64 input has 8x8 + 4x4 + 2x2 = 84 positions, fewer than 100 queries: all are kept."""
    head = _head(kind, num_queries=100, learn_initial_query=True).train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
    out = head(_features(h=64, w=64), targets)
    assert out["pred_logits"].shape == (2, 84, 3) and out["dn_meta"]["dn_num_split"] == [20, 84]
    assert len(head.predict(out, [(64, 64)] * 2)[0]["scores"]) == 12      # num_top_queries


class _FirstQueryCriterion(torch.nn.Module):
    """A stand-in for the set criterion: the first query of each image must predict the image's
    only object, every other query background, on every layer and the encoder proposals."""

    def forward(self, outputs, targets):
        from torchvision.ops import sigmoid_focal_loss

        total = 0.0
        for layer in [outputs, *outputs["aux_outputs"], *outputs["enc_aux_outputs"]]:
            onehot = torch.zeros_like(layer["pred_logits"])
            for b, t in enumerate(targets):
                onehot[b, 0, t["labels"][0]] = 1
            gt = torch.stack([t["boxes"][0] for t in targets])
            total = total + 20 * sigmoid_focal_loss(layer["pred_logits"], onehot, reduction="mean")
            total = total + (layer["pred_boxes"][:, 0] - gt).abs().mean() * 5
        return {"loss_first_query": total}


@pytest.mark.parametrize("kind", ["RTDETRHead", "DFINEHead"])
def test_a_few_iterations_lower_the_loss(kind):
    head = _head(kind, criterion=_FirstQueryCriterion(), num_denoising=0).train()
    features = _features(h=64, w=96)
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 56.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[50.0, 4.0, 90.0, 30.0]]), "labels": torch.tensor([0])}]
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = head.loss(head(features), targets, [(64, 96)] * 2)["loss_first_query"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_criterion_from_a_config_node(monkeypatch):
    import sys
    import types

    class ToyCriterion(torch.nn.Module):
        def __init__(self, *, num_classes: int, weight: float = 1.0):
            super().__init__()
            self.num_classes, self.weight = num_classes, weight

    fake = types.ModuleType("detkit.models.detr.criterion")
    fake.ToyCriterion, fake.__all__ = ToyCriterion, ["ToyCriterion"]
    monkeypatch.setitem(sys.modules, "detkit.models.detr.criterion", fake)
    head = HEADS.build({"type": "DFINEHead", **SMALL, "criterion": {"type": "ToyCriterion", "weight": 2.0}},
                       "model.head", input_shapes=SHAPES, num_classes=3)
    assert isinstance(head.criterion, ToyCriterion) and head.criterion.num_classes == 3
    with pytest.raises(ConfigError, match=r"model.head.criterion.type: unknown criterion 'ToyCriterio'"):
        HEADS.build({"type": "RTDETRHead", "criterion": {"type": "ToyCriterio"}}, "model.head",
                    input_shapes=SHAPES, num_classes=3)
    with pytest.raises(ConfigError, match="model.head.criterion.wieght"):
        HEADS.build({"type": "RTDETRHead", "criterion": {"type": "ToyCriterion", "wieght": 1}}, "model.head",
                    input_shapes=SHAPES, num_classes=3)


@pytest.mark.parametrize("kind,exportable", [("RTDETRHead", False), ("DFINEHead", True)])
def test_training_step_under_bfloat16_autocast(kind, exportable):
    head = _head(kind, exportable=exportable).train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(_features(), targets)
    layers = [out, *out["aux_outputs"], *out["dn_outputs"], *out["enc_aux_outputs"]]
    total = sum(x["pred_boxes"].float().sum() + x["pred_logits"].float().mean() for x in layers)
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in head.decoder.layers[0].cross_attn.sampling_offsets.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
