"""RPNHead: equal to torchvision's RegionProposalNetwork (proposals and losses), empty and crowd
targets, train/test top-k numbers, a few steps lower the loss, config errors."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from detkit.models.heads.rpn import RPNHead
from detkit.registry import HEADS, ConfigError
from detkit.structures import ShapeSpec

CH = 16
SHAPES = {"p3": ShapeSpec(CH, 8), "p4": ShapeSpec(CH, 16), "p5": ShapeSpec(CH, 32)}
SIZES = [[32], [64], [128]]
PADDED = (128, 160)
IMAGE_SIZES = [(128, 160), (100, 150)]
TOPK = dict(pre_nms_topk_train=300, pre_nms_topk_test=100, post_nms_topk_train=200, post_nms_topk_test=50)


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(2, CH, PADDED[0] // s.stride, PADDED[1] // s.stride, generator=g)
            for k, s in SHAPES.items()}


def _targets():
    return [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 10.0, 150.0, 60.0]]),
             "labels": torch.tensor([0, 1])},
            {"boxes": torch.tensor([[30.0, 30.0, 90.0, 80.0]]), "labels": torch.tensor([2])}]


def _pair():
    """A detkit RPNHead and a torchvision RPN with the same weights and settings."""
    torch.manual_seed(0)
    ours = RPNHead(input_shapes=SHAPES, anchor_sizes=SIZES, **TOPK)
    head = TVRPNHead(CH, 3)
    tv = RegionProposalNetwork(TVAnchorGenerator(tuple(map(tuple, SIZES)), ((0.5, 1.0, 2.0),) * 3), head,
                               0.7, 0.3, 256, 0.5, dict(training=300, testing=100),
                               dict(training=200, testing=50), 0.7)
    with torch.no_grad():
        for w in ("weight", "bias"):  # larger weights than the 0.01 init: spread out the scores
            getattr(head.conv[0][0], w).normal_(std=0.3)
            getattr(head.cls_logits, w).normal_(std=0.3)
            getattr(head.bbox_pred, w).normal_(std=0.1)
            getattr(ours.conv[0], w).copy_(getattr(head.conv[0][0], w))
            getattr(ours.objectness, w).copy_(getattr(head.cls_logits, w))
            getattr(ours.deltas, w).copy_(getattr(head.bbox_pred, w))
    return ours, tv


@pytest.mark.parametrize("training", [False, True])
def test_proposals_equal_torchvision(training):
    ours, tv = _pair()
    ours.train(training), tv.train(training)
    feats = _features()
    images = TVImageList(torch.zeros(2, 3, *PADDED), IMAGE_SIZES)
    targets = [dict(t, labels=t["labels"] + 1) for t in _targets()]
    with torch.no_grad():
        expected, _ = tv(images, feats, targets if training else None)
        got = ours.predict(ours(feats), IMAGE_SIZES)
    for exp, res, (h, w) in zip(expected, got, IMAGE_SIZES):
        assert res["boxes"].shape[0] == exp.shape[0] == (200 if training else 50)
        assert torch.allclose(res["boxes"], exp, atol=1e-4)
        assert (res["boxes"][:, 2] <= w).all() and (res["boxes"][:, 3] <= h).all()
        assert (res["scores"][:-1] >= res["scores"][1:]).all()  # best first


def test_losses_equal_torchvision_with_the_same_seed():
    ours, tv = _pair()
    feats = _features(1)
    images = TVImageList(torch.zeros(2, 3, *PADDED), IMAGE_SIZES)
    torch.manual_seed(5)
    _, expected = tv(images, feats, _targets())
    torch.manual_seed(5)
    got = ours.loss(ours(feats), _targets(), IMAGE_SIZES)
    assert torch.allclose(got["loss_rpn_cls"], expected["loss_objectness"], atol=1e-5)
    assert torch.allclose(got["loss_rpn_box"], expected["loss_rpn_box_reg"], atol=1e-5)


def test_output_shapes():
    ours, _ = _pair()
    out = ours(_features())
    assert [tuple(o.shape) for o in out["objectness"]] == [(2, 3, 16, 20), (2, 3, 8, 10), (2, 3, 4, 5)]
    assert [tuple(d.shape) for d in out["deltas"]] == [(2, 12, 16, 20), (2, 12, 8, 10), (2, 12, 4, 5)]
    assert [a.shape[0] for a in out["anchors"]] == [960, 240, 60]


def test_empty_image_has_finite_loss_and_zero_box_loss():
    ours, _ = _pair()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = ours.loss(ours(_features()), empty, IMAGE_SIZES)
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"] > 0
    assert losses["loss_rpn_box"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(ours.objectness.weight.grad).all()


def test_crowd_boxes_are_never_positive_and_cover_ignored_anchors():
    ours, _ = _pair()
    anchors = torch.cat(ours(_features())["anchors"])
    crowd = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([0]),
             "iscrowd": torch.tensor([True])}
    labels, _ = ours.assign(anchors, crowd)
    assert (labels == 1).sum() == 0
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= 100) & (anchors[:, 3] <= 100)
    assert (labels[inside] == -1).all()
    assert (labels[anchors[:, 0] >= 100] == 0).all()
    as_regular = ours.assign(anchors, {"boxes": crowd["boxes"], "labels": crowd["labels"]})[0]
    assert (as_regular == 1).sum() > 0  # the same box without the flag does give positives


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    rpn = RPNHead(input_shapes=SHAPES, anchor_sizes=SIZES)
    rpn.generator = torch.Generator().manual_seed(0)
    feats = _features(2)
    opt = torch.optim.SGD(rpn.parameters(), lr=0.05, momentum=0.9)
    history = []
    for _ in range(15):
        losses = rpn.loss(rpn(feats), _targets(), IMAGE_SIZES)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0]


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="anchor_sizes has 2 levels"):
        RPNHead(input_shapes=SHAPES, anchor_sizes=[[32], [64]])
    with pytest.raises(ConfigError, match=r"model\.rpn.*in_features"):
        HEADS.build({"type": "RPNHead", "in_features": ["p9"]}, "model.rpn", input_shapes=SHAPES)
    mixed = dict(SHAPES, p3=ShapeSpec(8, 8))
    with pytest.raises(ValueError, match="equal channels"):
        RPNHead(input_shapes=mixed, anchor_sizes=SIZES)
