"""RoIHead: equal to torchvision's RoIHeads (detections and losses), sampling counts, crowd and
empty targets, post-processing limits, box-head variants, pooler scales."""

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.faster_rcnn import TwoMLPHead as TVTwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou

from detkit.models.heads.roi_head import ConvFCHead, Res5Head, RoIHead, TwoMLPHead, make_pooler
from detkit.registry import HEADS, ConfigError
from detkit.structures import ShapeSpec

CH, C = 16, 3
SHAPES = {"p3": ShapeSpec(CH, 8), "p4": ShapeSpec(CH, 16), "p5": ShapeSpec(CH, 32)}
PADDED = (128, 160)
IMAGE_SIZES = [(128, 160), (100, 150)]


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(2, CH, PADDED[0] // s.stride, PADDED[1] // s.stride, generator=g)
            for k, s in SHAPES.items()}


def _proposals(n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in IMAGE_SIZES:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(n, 2, generator=g) * 90 + 6
        out.append(torch.cat([xy, torch.min(xy + wh, torch.tensor([w, h]))], 1))
    return out


def _targets():
    return [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 10.0, 150.0, 60.0]]),
             "labels": torch.tensor([0, 2])},
            {"boxes": torch.tensor([[30.0, 30.0, 90.0, 80.0]]), "labels": torch.tensor([1])}]


def _pair(score_thresh=0.05):
    torch.manual_seed(0)
    ours = RoIHead(input_shapes=SHAPES, num_classes=C, batch_size_per_image=64, score_thresh=score_thresh,
                   box_head=TwoMLPHead(in_channels=CH, resolution=7, fc_dim=32))
    tv = RoIHeads(MultiScaleRoIAlign(["p3", "p4", "p5"], 7, 2), TVTwoMLPHead(CH * 49, 32),
                  FastRCNNPredictor(32, C + 1), 0.5, 0.5, 64, 0.25, None, score_thresh, 0.5, 100)
    with torch.no_grad():
        for name in ("fc6", "fc7"):
            getattr(ours.box_head, name).load_state_dict(getattr(tv.box_head, name).state_dict())
        pred = tv.box_predictor
        pred.bbox_pred.weight.normal_(std=0.3)
        ours.cls_score.weight.copy_(pred.cls_score.weight[[1, 2, 3, 0]])  # background goes last
        ours.cls_score.bias.copy_(pred.cls_score.bias[[1, 2, 3, 0]])
        ours.bbox_pred.weight.copy_(pred.bbox_pred.weight[4:])            # no background boxes
        ours.bbox_pred.bias.copy_(pred.bbox_pred.bias[4:])
    return ours, tv


def test_detections_equal_torchvision():
    ours, tv = _pair(score_thresh=0.2)
    ours.eval(), tv.eval()
    feats, props = _features(), _proposals()
    with torch.no_grad():
        expected, _ = tv(feats, props, IMAGE_SIZES)
        got = ours.predict(ours(feats, props, IMAGE_SIZES), IMAGE_SIZES)
    for exp, res in zip(expected, got):
        assert 0 < res["boxes"].shape[0] == exp["boxes"].shape[0]
        assert torch.allclose(res["boxes"], exp["boxes"], atol=1e-3)
        assert torch.allclose(res["scores"], exp["scores"], atol=1e-5)
        assert torch.equal(res["labels"], exp["labels"] - 1)


def test_losses_equal_torchvision_with_the_same_seed():
    ours, tv = _pair()
    ours.train(), tv.train()
    feats, props = _features(1), _proposals(seed=1)
    torch.manual_seed(3)
    _, expected = tv(feats, [p.clone() for p in props], IMAGE_SIZES,
                     [dict(t, labels=t["labels"] + 1) for t in _targets()])
    torch.manual_seed(3)
    rois, samples = ours.sample_proposals(props, _targets())
    got = ours.loss(ours(feats, rois, IMAGE_SIZES), samples)
    assert torch.allclose(got["loss_cls"], expected["loss_classifier"], atol=1e-5)
    assert torch.allclose(got["loss_box"], expected["loss_box_reg"], atol=1e-5)


def test_sampling_counts_labels_and_gt_as_proposals():
    ours, _ = _pair()
    targets = _targets()
    rois, samples = ours.sample_proposals(_proposals(400), targets)
    for boxes, sample, target in zip(rois, samples, targets):
        fg = sample["labels"] < C
        assert boxes.shape[0] == 64 and 0 < fg.sum() <= 16  # 64 per image, <= 25 % foreground
        iou = box_iou(boxes[fg], target["boxes"])
        assert (iou.max(1).values >= 0.5).all()
        assert torch.equal(sample["labels"][fg], target["labels"][iou.argmax(1)])
        assert (box_iou(boxes[~fg], target["boxes"]).max(1).values < 0.5).all()
        assert (iou == 1).any(0).all()  # every gt box is among the RoIs (added as a proposal)


def test_crowd_boxes_are_not_proposals_and_cover_ignored_rois():
    ours, _ = _pair()
    crowd_box = torch.tensor([[0.0, 0.0, 80.0, 80.0]])
    target = {"boxes": torch.cat([torch.tensor([[100.0, 60.0, 150.0, 120.0]]), crowd_box]),
              "labels": torch.tensor([1, 0]), "iscrowd": torch.tensor([False, True])}
    inside = torch.tensor([[10.0, 10.0, 40.0, 40.0]]).repeat(50, 1)
    rois, samples = ours.sample_proposals([inside], [target])
    assert not (box_iou(rois[0], crowd_box) > 0.99).any()
    assert not (box_iou(rois[0], inside[:1]) > 0.99).any()  # covered proposals are not negatives
    assert samples[0]["labels"].tolist() == [1]  # only the regular gt box, as a proposal


def test_empty_targets_give_finite_losses_and_zero_box_loss():
    ours, _ = _pair()
    ours.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    rois, samples = ours.sample_proposals(_proposals(), empty)
    assert all((s["labels"] == C).all() for s in samples)
    losses = ours.loss(ours(_features(), rois, IMAGE_SIZES), samples)
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_box"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(ours.cls_score.weight.grad).all()


def test_predict_limits():
    ours, _ = _pair(score_thresh=0.0)
    ours.eval()
    ours.detections_per_image = 20
    with torch.no_grad():
        results = ours.predict(ours(_features(), _proposals(), IMAGE_SIZES), IMAGE_SIZES)
    for res, (h, w) in zip(results, IMAGE_SIZES):
        assert res["boxes"].shape == (20, 4) and res["labels"].dtype == torch.int64
        assert (res["labels"] >= 0).all() and (res["labels"] < C).all()
        assert (res["boxes"][:, 2] <= w).all() and (res["boxes"][:, 3] <= h).all()
        assert (res["scores"][:-1] >= res["scores"][1:]).all()


def test_class_agnostic_and_box_head_variants():
    feats, props = _features(), _proposals(30)
    head = RoIHead(input_shapes=SHAPES, num_classes=C, class_agnostic_box=True,
                   box_head=ConvFCHead(in_channels=CH, resolution=7, num_conv=2, conv_dim=32, fc_dim=32))
    out = head(feats, props, IMAGE_SIZES)
    assert out["class_logits"].shape == (60, C + 1) and out["box_deltas"].shape == (60, 4)
    rois, samples = head.sample_proposals(props, _targets())
    assert torch.isfinite(sum(head.loss(head(feats, rois, IMAGE_SIZES), samples).values()))
    with pytest.raises(ValueError, match="multiple of 32"):
        ConvFCHead(in_channels=CH, resolution=7, conv_dim=48)
    res5 = Res5Head(in_channels=256, resolution=14, depth=18)
    assert res5(torch.randn(3, 256, 14, 14)).shape == (3, 512) and res5.out_dim == 512
    with pytest.raises(ValueError, match="expects 256-channel"):
        Res5Head(in_channels=64, resolution=14, depth=18)


def test_pooler_scales_come_from_strides_not_the_first_batch():
    head = RoIHead(input_shapes=SHAPES, num_classes=C)
    feats = {k: torch.randn(1, CH, 2, 2) for k in SHAPES}  # a tiny 40 x 40 image padded to 64
    head(feats, [torch.tensor([[0.0, 0.0, 30.0, 30.0]])], [(40, 40)])
    assert head.pooler.scales == [1 / 8, 1 / 16, 1 / 32]  # torchvision would infer 1/16 for p5 here
    with pytest.raises(ValueError, match="consecutive powers of two"):
        make_pooler(["a", "b"], [8, 32], 7, 2)


def test_from_config_builds_the_box_head_and_reports_errors():
    head = HEADS.build({"type": "RoIHead", "box_head": {"type": "TwoMLPHead", "fc_dim": 64}},
                       "model.roi_head", input_shapes=SHAPES, num_classes=C)
    assert head.box_head.fc6.in_features == CH * 49 and head.cls_score.out_features == C + 1
    with pytest.raises(ConfigError, match=r"model\.roi_head\.box_head.*fc_dims"):
        HEADS.build({"type": "RoIHead", "box_head": {"type": "TwoMLPHead", "fc_dims": 64}},
                    "model.roi_head", input_shapes=SHAPES, num_classes=C)
    with pytest.raises(ConfigError, match=r"model\.roi_head.*score_tresh"):
        HEADS.build({"type": "RoIHead", "score_tresh": 0.1}, "model.roi_head",
                    input_shapes=SHAPES, num_classes=C)


def test_images_without_any_proposal():
    ours, _ = _pair()
    no_props = [torch.zeros(0, 4), _proposals(5)[1]]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    rois, samples = ours.sample_proposals([torch.zeros(0, 4)] * 2, empty)
    losses = ours.loss(ours(_features(), rois, IMAGE_SIZES), samples)
    assert all(v.item() == 0.0 for v in losses.values())  # nothing to learn from, but no NaN
    ours.eval()
    with torch.no_grad():
        results = ours.predict(ours(_features(), no_props, IMAGE_SIZES), IMAGE_SIZES)
    assert results[0]["boxes"].shape == (0, 4) and results[1]["boxes"].shape[0] > 0


def test_res5_head_loads_layer4_of_a_torchvision_resnet_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    head = Res5Head(in_channels=256, resolution=14, depth=18, norm="FrozenBN",
                    weights=str(tmp_path / "r18.pth"))
    assert torch.equal(head.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(head.layer4[0].bn1.running_var, reference.layer4[0].bn1.running_var)
