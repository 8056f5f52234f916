"""CenterNetHead, CenterNetUpsample and the CenterNet configs on tiny CPU inputs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detkit.config import load_config
from detkit.data.transforms import build_pipeline
from detkit.models import build_model
from detkit.models.centernet_targets import render_targets
from detkit.models.heads.centernet_head import CenterNetHead, penalty_reduced_focal_loss
from detkit.models.necks.ct_upsample import CenterNetUpsample
from detkit.registry import ConfigError
from detkit.structures import ShapeSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "centernet"
SHAPES = {"p2": ShapeSpec(channels=8, stride=4)}


def _head(**kw):
    torch.manual_seed(0)
    return CenterNetHead(input_shapes=SHAPES, num_classes=3, head_channels=8, **kw)


def _target(boxes, labels, **extra):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), **extra}


EMPTY = _target([], [])
EMPTY["boxes"] = EMPTY["boxes"].reshape(0, 4)


def test_head_output_shapes_and_prior():
    head = _head()
    out = head({"p2": torch.randn(2, 8, 6, 7)})
    assert out["heatmap"].shape == (2, 3, 6, 7)
    assert out["wh"].shape == (2, 2, 6, 7) and out["offset"].shape == (2, 2, 6, 7)
    assert head.heatmap[-1].bias.eq(-2.19).all()
    assert torch.sigmoid(head.heatmap[-1].bias).mean().item() == pytest.approx(0.1, abs=0.001)
    assert out["wh"].abs().max() < 0.1   # regressions start near zero
    with pytest.raises(ValueError, match="in_feature 'p3'"):
        CenterNetHead(input_shapes=SHAPES, num_classes=3, in_feature="p3")


def test_focal_loss_matches_hand_formula():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    p = torch.sigmoid(logits)[0, 0]
    expected = -((1 - p[0, 0]) ** 2 * p[0, 0].log()
                 + (1 - 0.5) ** 4 * p[0, 1] ** 2 * (1 - p[0, 1]).log()
                 + p[1, 0] ** 2 * (1 - p[1, 0]).log() + p[1, 1] ** 2 * (1 - p[1, 1]).log())
    assert penalty_reduced_focal_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    ignore = torch.tensor([[[[False, False], [False, True]]]])
    expected_ign = expected + p[1, 1] ** 2 * (1 - p[1, 1]).log()
    assert penalty_reduced_focal_loss(logits, target, ignore).item() == pytest.approx(
        expected_ign.item(), rel=1e-6)
    # the clamp keeps saturated logits finite
    assert torch.isfinite(penalty_reduced_focal_loss(torch.tensor([50.0, -50.0]), torch.tensor([0.0, 1.0])))


def test_loss_weights_and_normalisation():
    head = _head()
    out = head({"p2": torch.randn(1, 8, 8, 8)})
    targets = [_target([[2.0, 3.0, 14.0, 11.0], [16.0, 16.0, 30.0, 31.0]], [0, 2])]
    losses = head.loss(out, targets, [(32, 32)])
    t = render_targets(targets, [(32, 32)], (8, 8), 3, 4)
    focal = penalty_reduced_focal_loss(out["heatmap"], t.heatmap, t.ignore)
    assert losses["loss_heatmap"].item() == pytest.approx(focal.item() / 2, rel=1e-5)
    wh_pred = out["wh"].permute(0, 2, 3, 1).reshape(-1, 2)[t.indices]
    assert t.wh.tolist() == [[3.0, 2.0], [3.5, 3.75]]   # cells = pixels / 4
    assert losses["loss_wh"].item() == pytest.approx(0.1 * (wh_pred - t.wh).abs().mean().item(), rel=1e-5)
    assert set(losses) == {"loss_heatmap", "loss_wh", "loss_offset"}


def test_focal_normaliser_is_the_number_of_peak_cells():
    # three objects, two of class 0 centred in the same cell (8, 8): 2 peak cells. The reference
    # code divides by the peaks (2), detkit's earlier form by the objects (3).
    head = _head()
    out = head({"p2": torch.randn(1, 8, 16, 16)})
    targets = [_target([[20.0, 20.0, 48.0, 48.0], [28.0, 26.0, 40.0, 42.0], [4.0, 4.0, 16.0, 20.0]],
                       [0, 0, 1])]
    t = render_targets(targets, [(64, 64)], (16, 16), 3, 4)
    assert t.num_objects == 3 and t.num_peaks == 2 and t.indices[0] == t.indices[1]
    focal = penalty_reduced_focal_loss(out["heatmap"], t.heatmap, t.ignore).item()
    assert head.loss(out, targets, [(64, 64)])["loss_heatmap"].item() == pytest.approx(focal / 2, rel=1e-5)
    by_objects = _head(focal_normalizer="objects").loss(out, targets, [(64, 64)])["loss_heatmap"]
    assert by_objects.item() == pytest.approx(focal / 3, rel=1e-5)
    with pytest.raises(ValueError, match="focal_normalizer 'boxes'"):
        _head(focal_normalizer="boxes")


def test_empty_images_give_finite_negative_only_loss():
    head = _head()
    feats = torch.randn(2, 8, 8, 8, requires_grad=True)
    out = head({"p2": feats})
    losses = head.loss(out, [EMPTY, EMPTY], [(32, 32), (32, 32)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_wh"].item() == 0 and losses["loss_offset"].item() == 0
    p = torch.sigmoid(out["heatmap"]).clamp(1e-4, 1 - 1e-4)
    negatives_only = -(p ** 2 * (1 - p).log()).sum()      # divided by max(0 objects, 1) = 1
    assert losses["loss_heatmap"].item() == pytest.approx(negatives_only.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_a_few_steps_lower_the_loss():
    head = _head()
    feats = {"p2": torch.randn(2, 8, 8, 8)}
    targets = [_target([[2.0, 3.0, 14.0, 11.0]], [1]), _target([[10.0, 12.0, 30.0, 26.0]], [0])]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = sum(head.loss(head(feats), targets, [(32, 32)] * 2).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_predict_from_rendered_targets_and_nms_switch():
    head = _head(score_thresh=0.05)
    boxes = [[0.0, 0.0, 12.0, 9.0], [13.0, 11.0, 31.0, 34.0]]   # the second leaves the image
    t = render_targets([_target(boxes, [0, 1])], [(30, 32)], (8, 8), 3, 4)
    dense = {}
    for name, values in (("wh", t.wh), ("offset", t.offset)):
        m = torch.zeros(64, 2)
        m[t.indices] = values
        dense[name] = m.view(1, 8, 8, 2).permute(0, 3, 1, 2)
    logits = torch.logit(t.heatmap.clamp(1e-6, 1 - 1e-6))
    res = head.predict({"heatmap": logits, **dense}, [(30, 32)])[0]
    assert (res["scores"] > 0.05).all() and res["scores"].max() == pytest.approx(1.0, abs=1e-5)
    top = res["scores"] > 0.99
    assert top.sum() == 2
    expected = torch.tensor([[0.0, 0.0, 12.0, 9.0], [13.0, 11.0, 31.0, 30.0]])
    assert (box_iou(expected, res["boxes"][top]).max(1).values > 0.99).all()
    assert res["boxes"][:, 3].max() <= 30   # clipped to the unpadded image height

    noisy = {"heatmap": torch.full((1, 3, 8, 8), -3.0), "wh": torch.full((1, 2, 8, 8), 6.0),
             "offset": torch.zeros(1, 2, 8, 8)}
    noisy["heatmap"][0, 2, 3, 3], noisy["heatmap"][0, 2, 3, 5] = 2.0, 1.0  # two peaks, IoU 0.5
    plain = _head(score_thresh=0.5)
    with_nms = _head(score_thresh=0.5, nms_iou_thresh=0.3)
    assert len(plain.predict(noisy, [(32, 32)])[0]["boxes"]) == 2
    assert len(with_nms.predict(noisy, [(32, 32)])[0]["boxes"]) == 1


def test_merge_flip_of_mirrored_outputs_is_identity():
    head = _head()
    out = head({"p2": torch.randn(1, 8, 4, 6)})
    mirrored = {k: v.flip(-1) for k, v in out.items()}
    merged = head.merge_flip(out, mirrored)
    assert torch.allclose(merged["heatmap"], out["heatmap"], atol=1e-4)
    assert torch.equal(merged["wh"], out["wh"]) and torch.equal(merged["offset"], out["offset"])


def test_bilinear_neck_upsamples_like_interpolate():
    neck = CenterNetUpsample(input_shapes={"c5": ShapeSpec(16, 32)}, channels=(4, 4, 4))
    assert neck.output_shape() == {"p2": ShapeSpec(4, 4)}
    x = torch.rand(1, 4, 6, 6)
    up = neck.stages[0].up(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert up.shape == (1, 4, 12, 12)
    assert torch.allclose(up[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6)
    out = neck({"c5": torch.randn(2, 16, 3, 5)})
    assert out["p2"].shape == (2, 4, 24, 40)
    with pytest.raises(ValueError, match="out_features"):
        CenterNetUpsample(input_shapes={"c4": ShapeSpec(16, 16)})


def test_neck_shortcuts_add_lateral_features():
    shapes = {"c3": ShapeSpec(6, 8), "c4": ShapeSpec(12, 16), "c5": ShapeSpec(16, 32)}
    neck = CenterNetUpsample(input_shapes=shapes, channels=(8, 4, 4), shortcuts=["c4", "c3"]).eval()
    feats = {"c3": torch.randn(1, 6, 8, 8), "c4": torch.randn(1, 12, 4, 4), "c5": torch.randn(1, 16, 2, 2)}
    with torch.no_grad():
        plain = neck.stages[2](neck.stages[1](neck.stages[0](feats["c5"])))
        assert not torch.allclose(neck(feats)["p2"], plain)
        for lateral in neck.laterals:   # a zero lateral conv (BN at init, eval) adds exactly 0
            lateral.conv.weight.zero_()
        assert torch.allclose(neck(feats)["p2"], plain)
    with pytest.raises(ValueError, match="stride 8, stage 0 outputs stride 16"):
        CenterNetUpsample(input_shapes=shapes, shortcuts=["c3"])
    with pytest.raises(ValueError, match="shortcut 'c2'"):
        CenterNetUpsample(input_shapes=shapes, shortcuts=["c4", "c3", "c2"])


def test_deformable_neck_starts_as_plain_conv():
    neck = CenterNetUpsample(input_shapes={"c5": ShapeSpec(8, 32)}, channels=(4, 4), deformable=True)
    assert neck.output_shape() == {"p2": ShapeSpec(4, 8)}
    dcn = neck.stages[0].conv.conv
    x = torch.randn(1, 8, 5, 5)
    assert torch.allclose(dcn(x), F.conv2d(x, dcn.weight, padding=1), atol=1e-5)  # zero offsets
    assert neck({"c5": torch.randn(1, 8, 4, 4)})["p2"].shape == (1, 4, 16, 16)


@pytest.mark.parametrize("name", ["centernet_r18_shapes", "centernet_r18_voc", "centernet_r18_coco",
                                  "centernet_r18_dcn_coco"])
def test_configs_build(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["model.backbone.weights=null"])  # no download
    model = build_model(cfg["model"])
    assert isinstance(model.head, CenterNetHead) and model.head.stride == 4
    assert model.head.num_classes == {"shapes": 4, "voc": 20}.get(name.split("_")[-1], 80)
    assert any("DeformConvBlock" in type(m).__name__ for m in model.modules()) == ("dcn" in name)
    for split in ("train", "val"):
        build_pipeline(cfg["data"][split]["pipeline"], f"data.{split}.pipeline")


def test_detector_train_eval_and_flip_on_tiny_resnet():
    cfg = load_config(CONFIGS / "centernet_r18_shapes.yaml")
    cfg["model"]["neck"]["channels"] = [16, 16, 8]
    model = build_model(cfg["model"])
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 60)]
    targets = [_target([[4.0, 6.0, 30.0, 40.0]], [3]), EMPTY]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_heatmap", "loss_wh", "loss_offset"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    metas = [{"scale": torch.tensor([0.5, 0.5]), "orig_size": torch.tensor([128, 128])},
             {"scale": torch.tensor([1.0, 1.0]), "orig_size": torch.tensor([48, 60])}]
    plain = model(images, metas)
    model.flip_test = True
    flipped = model(images, metas)
    # flip test through the config switch = merge_flip of the two halves, decoded
    batch = model.preprocess(images)
    mirrored = model.head(model.features(type(batch)(batch.tensor.flip(-1), batch.image_sizes)))
    direct = model.head(model.features(batch))
    expected = model.head.predict(model.head.merge_flip(direct, mirrored), batch.image_sizes)
    expected = [model.map_to_original(r, m) for r, m in zip(expected, metas)]
    for got, want in zip(flipped, expected):
        assert torch.allclose(got["boxes"], want["boxes"], atol=1e-4)
        assert torch.allclose(got["scores"], want["scores"], atol=1e-5)
    for res in plain + flipped:
        assert res["boxes"].shape[1] == 4 and len(res["boxes"]) <= 100
        assert res["labels"].max() < 4 and torch.isfinite(res["boxes"]).all()
    assert plain[0]["boxes"].max() <= 128 and plain[1]["boxes"][:, 2].max() <= 60


def test_unknown_head_key_is_a_config_error():
    cfg = load_config(CONFIGS / "centernet_r18_shapes.yaml")
    cfg["model"]["head"]["wh_wieght"] = 0.1
    with pytest.raises(ConfigError, match="wh_weight"):
        build_model(cfg["model"])


def test_flip_test_switch_from_config_and_refused_without_merge_flip():
    cfg = load_config(CONFIGS / "centernet_r18_shapes.yaml", ["model.flip_test=true"])
    cfg["model"]["neck"]["channels"] = [16, 16, 8]
    assert build_model(cfg["model"]).flip_test is True
    yolo = load_config(CONFIGS.parent / "yolo" / "yolov3_tiny_shapes.yaml", ["model.flip_test=true"])
    with pytest.raises(ConfigError, match="merge_flip"):
        build_model(yolo["model"])
